"""The documented response models (``megacore.inference.api_schema``) are what the server
really sends: each endpoint's real answer validates with ``extra="forbid"``, so a response
field added, renamed or removed without its model (and so the HTTP snapshot) fails here."""

import json

from megacore.inference import api_schema as schema
from tests.inference.test_server import srv  # noqa: F401  (the served tiny model)


def test_every_response_matches_its_model(srv):  # noqa: F811
    c = srv.client
    schema.MegatronGenerateResponse.model_validate(
        c.put("/api", json={"prompts": ["def f"], "tokens_to_generate": 3,
                            "logprobs": True}).json())
    body = c.post("/v1/completions", json={"prompt": ["def f", "x ="], "max_tokens": 3,
                                           "logprobs": 2, "echo": True}).json()
    schema.CompletionResponse.model_validate(body)
    assert body["choices"][0]["logprobs"]["token_logprobs"][0] is None
    schema.HealthResponse.model_validate(c.get("/health").json())
    schema.ModelList.model_validate(c.get("/v1/models").json())
    schema.ErrorResponse.model_validate(c.post("/v1/completions", json={}).json())


def test_stream_events_follow_the_documented_format(srv):  # noqa: F811
    with srv.client.stream("POST", "/v1/completions",
                           json={"prompt": "def f", "max_tokens": 4, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == schema.STREAM_END
    for event in events[:-1]:
        assert event.startswith("data: ")
        schema.CompletionStreamChunk.model_validate(json.loads(event[len("data: "):]))


def test_openapi_document_is_served_and_names_the_bodies(srv):  # noqa: F811
    doc = srv.client.get("/openapi.json").json()
    put = doc["paths"]["/api"]["put"]
    assert "prompts" in put["requestBody"]["content"]["application/json"]["schema"]["properties"]
    post = doc["paths"]["/v1/completions"]["post"]
    assert "text/event-stream" in post["responses"]["200"]["content"]
