"""The HTTP API on one process: every field's effect, errors, fuzzing, failures, load.

A tiny GPT with the demo GPT-2 vocabulary (examples/data) is served through FastAPI's
TestClient (the load test uses a real uvicorn on a free loopback port). Expected
outputs come from a second controller on the same model, called directly.
"""

import concurrent.futures
import json
import logging
import random
import socket
import threading
import time
import types

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from megacore.inference import (
    GenerationRequest,
    InferenceConfig,
    SamplingParams,
    TextGenerationController,
)
from megacore.inference.generation_service import GenerationService, ServiceConfig
from megacore.inference.server import ServerConfig, create_app
from megacore.inference.text_api import megatron_requests
from megacore.tokenizers import build_tokenizer
from tests.inference.tiny_model import (
    MERGE_FILE,
    VOCAB_FILE,
    build_chunks,
    destroy_single_process,
    init_single_process,
)

MAX_SEQ = 64
LP_TOL = dict(rtol=0, atol=1e-5)  # same process and model; only batch shapes differ


@pytest.fixture(scope="module")
def srv():
    init_single_process()
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB_FILE,
                                merge_file=MERGE_FILE)
    model = build_chunks("gpt", vocab=tokenizer.vocab_size, max_seq=MAX_SEQ, layers=2)[0]

    def controller():
        return TextGenerationController(model, InferenceConfig(max_batch_size=8),
                                        detokenize=tokenizer.detokenize)

    service = GenerationService(controller(), ServiceConfig(batch_wait_s=0.002)).start()
    config = ServerConfig(max_request_bytes=64 * 1024, max_tokens_to_generate=MAX_SEQ)
    app = create_app(service, tokenizer, config)
    try:
        with TestClient(app) as client:
            yield types.SimpleNamespace(client=client, tokenizer=tokenizer, app=app,
                                        service=service, reference=controller(),
                                        config=config)
    finally:
        service.stop()
        destroy_single_process()


def _greedy(srv, prompt, n, **kw):
    tokens = srv.tokenizer.tokenize(prompt)
    return srv.reference.generate([GenerationRequest(
        tokens, n, SamplingParams(temperature=0.0), **kw)])[0]


def _api(srv, **body):
    response = srv.client.put("/api", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _completion(srv, **body):
    response = srv.client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- PUT /api ---------------------------------------------------------------------------------
def test_api_greedy_text_tokens_and_logprobs(srv):
    ref = _greedy(srv, "def main", 8, return_prompt_logprobs=True)
    out = _api(srv, prompts=["def main", "import os"], tokens_to_generate=8, temperature=0.0,
               logprobs=True)
    assert out["tokens"][0] == ref.tokens
    assert out["text"][0] == srv.tokenizer.detokenize(ref.tokens)
    assert out["segments"][0] == [srv.tokenizer.detokenize([t]) for t in ref.tokens]
    assert len(out["logprobs"][0]) == len(ref.tokens) - 1
    assert out["logprobs"][0] == pytest.approx(ref.prompt_logprobs + ref.generated_logprobs,
                                               abs=1e-5)
    assert out["tokens"][1] == _greedy(srv, "import os", 8).tokens
    assert _api(srv, prompts=["def main"], tokens_to_generate=3)["logprobs"] is None


def test_api_tokens_to_generate(srv):
    for n in (0, 1, 5):
        out = _api(srv, prompts=["class A"], tokens_to_generate=n, temperature=0.0)
        assert len(out["tokens"][0]) == len(srv.tokenizer.tokenize("class A")) + n


def test_api_sampling_fields(srv):
    def gen(**kw):
        return _api(srv, prompts=["The value"], tokens_to_generate=12, **kw)["tokens"][0]

    greedy = _greedy(srv, "The value", 12).tokens
    assert gen(temperature=0.0) == greedy
    seeded = gen(temperature=1.0, random_seed=5)
    assert seeded == gen(temperature=1.0, random_seed=5) != greedy
    assert seeded != gen(temperature=1.0, random_seed=6)
    assert gen(temperature=3.0, random_seed=5) != seeded          # temperature changes draws
    assert gen(top_k=1, random_seed=5) == greedy                   # top_k=1 is greedy
    assert gen(top_k=5, random_seed=5) != seeded                   # top_k filters
    assert gen(top_p=1e-6, random_seed=5) == greedy                # tiny nucleus is greedy
    assert gen(top_p=0.5, random_seed=5) != seeded


def test_api_top_p_decay_and_bound(srv):
    prompt = "The value"

    def gen(**kw):
        return _api(srv, prompts=[prompt], tokens_to_generate=10, temperature=1.0,
                    random_seed=9, top_p=0.95, **kw)["tokens"][0]

    # Decay 1e-6: the first token is drawn with top_p 0.95, then the nucleus is one token.
    decayed = gen(top_p_decay=1e-6)
    n = len(srv.tokenizer.tokenize(prompt))
    first = decayed[:n + 1]
    cont = srv.reference.generate([GenerationRequest(first, 9, SamplingParams(temperature=0))])
    assert decayed == cont[0].tokens
    # A bound at top_p itself undoes the decay.
    assert gen(top_p_decay=1e-6, top_p_bound=0.95) == gen()


def test_api_add_bos_stop_token_and_seed_free_prompts(srv):
    out = _api(srv, prompts=["", "x"], tokens_to_generate=4, temperature=0.0, add_BOS=True)
    eod = srv.tokenizer.eod
    assert out["tokens"][0][0] == eod and out["tokens"][1][0] == eod
    assert out["tokens"][1][1:2] == srv.tokenizer.tokenize("x")
    free = _greedy(srv, "for i in", 10).generated_tokens
    stop_at = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    out = _api(srv, prompts=["for i in"], tokens_to_generate=10, temperature=0.0,
               stop_token=free[stop_at])
    assert out["tokens"][0][-(stop_at + 1):] == free[:stop_at + 1]
    assert out["finish_reason"] == ["stop"]


def test_api_eol_flags_become_stop_strings(srv):
    validate = srv.reference.validate_request

    def build(**kw):
        params = dict(prompts=["a"], tokens_to_generate=1, temperature=1.0, top_k=0, top_p=0.0,
                      top_p_decay=0.0, top_p_bound=0.0, random_seed=-1, stop_token=None,
                      add_BOS=False, logprobs=False, stop_on_eol=False, stop_on_double_eol=False)
        params.update(kw)
        return megatron_requests(types.SimpleNamespace(**params), srv.tokenizer, validate)[0]

    assert build().stop_strings == ()
    assert build(stop_on_eol=True).stop_strings == ("\n",)
    assert build(stop_on_double_eol=True).stop_strings == ("\n\n",)
    assert build().stop_token_ids == (srv.tokenizer.eod,)
    assert build(random_seed=4).sampling.seed == 4 and build().sampling.seed is None


def test_api_no_log(srv, caplog):
    with caplog.at_level(logging.INFO, logger="megacore.inference.server"):
        _api(srv, prompts=["a"], tokens_to_generate=1, no_log=True)
        assert not [r for r in caplog.records if "PUT /api" in r.getMessage()]
        _api(srv, prompts=["a"], tokens_to_generate=1)
        assert [r for r in caplog.records if "PUT /api" in r.getMessage()]


# -- POST /v1/completions ------------------------------------------------------------------
def test_completions_fields(srv):
    ref = _greedy(srv, "import", 6)
    out = _completion(srv, prompt="import", max_tokens=6, temperature=0.0)
    completion = srv.tokenizer.detokenize(ref.generated_tokens)
    assert out["choices"][0]["text"] == completion
    assert out["usage"] == {"prompt_tokens": len(ref.prompt_tokens), "completion_tokens": 6,
                            "total_tokens": len(ref.tokens)}
    assert _completion(srv, prompt="import", max_tokens=6, top_p=1e-6, seed=1)[
        "choices"][0]["text"] == completion
    a = _completion(srv, prompt="import", max_tokens=8, seed=3, n=3)
    texts = [c["text"] for c in a["choices"]]
    assert len(set(texts)) == 3 and [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in _completion(srv, prompt="import", max_tokens=8, seed=3,
                                                    n=3)["choices"]]
    assert _completion(srv, prompt="import", max_tokens=8, seed=3, temperature=0.5)[
        "choices"][0]["text"] != texts[0]
    two = _completion(srv, prompt=["import", "def"], max_tokens=2, temperature=0.0)
    assert [c["text"] for c in two["choices"]] == [
        srv.tokenizer.detokenize(_greedy(srv, p, 2).generated_tokens) for p in ("import", "def")]


def test_completions_stop_echo_logprobs(srv):
    ref = _greedy(srv, "return", 10)
    full = srv.tokenizer.detokenize(ref.generated_tokens)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    out = _completion(srv, prompt="return", max_tokens=10, temperature=0.0, stop=[stop])
    assert out["choices"][0]["text"] == full[:full.find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    out = _completion(srv, prompt="return", max_tokens=4, temperature=0.0, echo=True,
                      logprobs=3)
    choice = out["choices"][0]
    assert choice["text"].startswith("return")
    lp = choice["logprobs"]
    n_prompt = len(ref.prompt_tokens)
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == n_prompt + 4
    assert all(len(t) <= 3 for t in lp["top_logprobs"][1:])
    assert max(lp["top_logprobs"][-1].values()) == pytest.approx(lp["token_logprobs"][-1])
    assert lp["text_offset"][n_prompt] == len("return")
    plain = _completion(srv, prompt="return", max_tokens=4, temperature=0.0)["choices"][0]
    assert plain["logprobs"] is None and choice["text"] == "return" + plain["text"]


def test_completions_stream_matches_non_stream(srv):
    body = dict(prompt="while", max_tokens=12, seed=2, n=2, echo=True)
    expected = [c["text"] for c in _completion(srv, **body)["choices"]]
    response = srv.client.post("/v1/completions", json={**body, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    texts, finish = ["", ""], [None, None]
    for event in events[:-1]:
        choice = json.loads(event)["choices"][0]
        texts[choice["index"]] += choice["text"]
        finish[choice["index"]] = choice["finish_reason"] or finish[choice["index"]]
    assert texts == expected and finish == ["length", "length"]


def test_health_and_models(srv):
    assert srv.client.get("/health").json()["status"] == "ok"
    assert srv.client.get("/v1/models").json()["data"][0]["id"] == srv.config.model_name


# -- errors ------------------------------------------------------------------------------------
ERROR_CASES = [
    ("PUT", "/api", b"{not json", 400, "body"),
    ("PUT", "/api", b"[1, 2]", 422, "body"),
    ("PUT", "/api", b'{"prompts": ["a"], "temperature": NaN}', 400, "body"),
    ("PUT", "/api", {"tokens_to_generate": 3}, 422, "prompts"),
    ("PUT", "/api", {"prompts": []}, 422, "prompts"),
    ("PUT", "/api", {"prompts": "a"}, 422, "prompts"),
    ("PUT", "/api", {"prompts": ["a"], "beam_width": 2}, 422, "beam_width"),
    ("PUT", "/api", {"prompts": ["a"], "temperature": "hot"}, 422, "temperature"),
    ("PUT", "/api", {"prompts": ["a"], "temperature": 101}, 422, "temperature"),
    ("PUT", "/api", {"prompts": ["a"], "top_k": -1}, 422, "top_k"),
    ("PUT", "/api", {"prompts": ["a"], "top_p": 1.5}, 422, "top_p"),
    ("PUT", "/api", {"prompts": ["a"], "logprobs": 1}, 422, "logprobs"),
    ("PUT", "/api", {"prompts": ["a"], "random_seed": -2}, 422, "random_seed"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": 1, "top_p_decay": 0.5}, 400,
     "top_p_decay"),
    ("PUT", "/api", {"prompts": [""]}, 400, "prompts"),
    ("PUT", "/api", {"prompts": ["a"] * 9}, 400, "prompts"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": 65}, 400, "tokens_to_generate"),
    ("PUT", "/api", {"prompts": ["a " * 30], "tokens_to_generate": 40}, 400,
     "tokens_to_generate"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": 1, "stop_token": 6000}, 400,
     "stop_token"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1000}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "n": 9}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": 6}, 422, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": 1, "stream": True}, 400,
     "logprobs"),
    ("POST", "/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ("POST", "/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, 422,
     "presence_penalty"),
    ("POST", "/v1/completions", {"prompt": [], "max_tokens": 1}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "a", "seed": 1.5}, 422, "seed"),
    ("POST", "/v1/completions", {"prompt": "a", "top_p": 0}, 422, "top_p"),
    # The GPT-2 BPE tokenizer has no chat template (see tests/checkpointing/conversion/
    # test_hf_families.py for a served chat template).
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}, 400,
     "messages"),
    ("POST", "/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "model": "gpt-4"}, 404, "model"),
    # Streaming is accepted; without a template it is still the messages that fail.
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "stream": True}, 400, "messages"),
    ("PUT", "/api", b"x" * (64 * 1024 + 1), 413, "body"),
    ("GET", "/api", b"", 405, None),
    ("POST", "/nowhere", b"{}", 404, None),
]


@pytest.mark.parametrize("method, path, body, status, param", ERROR_CASES)
def test_errors_are_4xx_json_naming_the_field(srv, method, path, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = srv.client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_chunked_body_over_the_limit_is_413(srv):
    def chunks():
        for _ in range(100):
            yield b" " * 1024

    response = srv.client.put("/api", content=chunks())
    assert response.status_code == 413


def test_internal_failure_is_500_and_the_server_keeps_serving(srv, monkeypatch):
    controller = srv.service.controller
    real = controller.generate

    def broken(*args, **kwargs):
        monkeypatch.setattr(controller, "generate", real)
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(controller, "generate", broken)
    response = srv.client.put("/api", json={"prompts": ["a"], "tokens_to_generate": 2})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "internal_error"
    assert _api(srv, prompts=["a"], tokens_to_generate=2)["text"]


# -- fuzzing -----------------------------------------------------------------------------------
_API_FIELDS = {"prompts": ["a"], "tokens_to_generate": 2, "temperature": 1.0, "top_k": 0,
               "top_p": 0.0, "logprobs": False, "add_BOS": False, "stop_on_eol": False,
               "stop_on_double_eol": False, "random_seed": -1, "no_log": True}
_COMPLETION_FIELDS = {"prompt": "a", "max_tokens": 2, "temperature": 1.0, "top_p": 1.0, "n": 1,
                      "seed": 1, "logprobs": 1, "echo": False, "stream": False}
# Values no field accepts where a field of each kind is expected.
_BAD = {
    list: [None, 1, "a", {"a": 1}, [1], [None], [["a"]], True],
    int: [None, "1", 1.5, True, [], {}, -10**30, 10**30],
    float: [None, "1.0", True, [], {}, -5.0, 1e300],
    bool: [None, 0, 1, "true", [], {}],
    str: [None, 1, True, [1], {}, ""],
}


_OPTIONAL = {"seed", "logprobs"}  # completions fields where null is valid


def _bad_value(rng, field, value):
    kind = bool if isinstance(value, bool) else type(value)
    if field == "prompt":
        return rng.choice([None, 1, True, {}, [1], [None], ""])
    return rng.choice([v for v in _BAD[kind] if not (v is None and field in _OPTIONAL)])


def _fuzz_payload(rng):
    """A body that must be rejected: one to three bad mutations of a valid body."""
    path, fields = rng.choice([("/api", _API_FIELDS), ("/v1/completions", _COMPLETION_FIELDS)])
    kind = rng.random()
    if kind < 0.15:
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        return path, raw.replace(b"{", b"(")  # never a JSON object
    if kind < 0.25:
        text = json.dumps({k: v for k, v in fields.items()})
        return path, text[:rng.randint(0, len(text) - 1)].encode()  # truncated JSON
    body = dict(fields)
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        name = rng.choice(sorted(fields))
        if action < 0.5:
            body[name] = _bad_value(rng, name, fields[name])
        elif action < 0.7:
            body["x_" + "".join(rng.choice("abcdefgh") for _ in range(5))] = rng.random()
        elif action < 0.8:
            body.pop("prompts" if path == "/api" else "prompt", None)
        elif action < 0.9:
            limit = "tokens_to_generate" if path == "/api" else "max_tokens"
            body[limit] = rng.randint(MAX_SEQ + 1, 10**6)
        else:
            body = rng.choice([[body], "text", 3, None, [], True])
            break
    return path, json.dumps(body).encode()


def test_fuzzed_bad_payloads_get_4xx(srv):
    rng = random.Random(20240613)
    statuses = {}
    for _ in range(1000):
        path, body = _fuzz_payload(rng)
        method = "PUT" if path == "/api" else "POST"
        response = srv.client.request(method, path, content=body)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert "error" in response.json()
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert set(statuses) <= {400, 413, 422}
    assert srv.client.get("/health").status_code == 200


# -- load on a real server ---------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_load_on_loopback(srv):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(srv.app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    prompts = ["def f", "import sys", "class Node", "return x", "for item in", "The"]
    expected = {p: srv.tokenizer.detokenize(_greedy(srv, p, 4).tokens) for p in prompts}
    batches_before = srv.service.batches_run
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            def call(i):
                prompt = prompts[i % len(prompts)]
                r = client.put("/api", json={"prompts": [prompt], "tokens_to_generate": 4,
                                             "temperature": 0.0, "no_log": True})
                return r.status_code, r.json()["text"][0], prompt

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                outcomes = list(pool.map(call, range(200)))
    finally:
        server.should_exit = True
        thread.join(30)
    assert [s for s, _, _ in outcomes] == [200] * 200
    assert all(text == expected[prompt] for _, text, prompt in outcomes)
    # Concurrent requests shared batches.
    assert srv.service.batches_run - batches_before < 200
