"""The OpenAI completions and chat APIs against real clients, with transformers as truth.

A tiny random GPT-2 with a ChatML chat template (``hf_tiny``) is imported through the
checkpoint converter and served on a loopback port by uvicorn. The reference for every
number is the same model run by ``transformers``:

* every prompt form (string, strings, token ids, token-id lists) and ``max_tokens`` 0
  with ``echo`` give 200 and the prompt log probabilities transformers computes;
* the ``openai`` Python client drives completions and chat completions (plain and
  streamed);
* lm-evaluation-harness's ``local-completions`` model with its defaults
  (``tokenized_requests=True``) gives transformers' log-likelihoods (|delta| <= 1e-3)
  and greedy continuations; ``local-chat-completions`` gives transformers' greedy reply
  to the prompt ``apply_chat_template`` renders, which equals megacore's rendering.

Log probabilities differ from transformers by float32 rounding of different op orders
(fused QKV, GeLU and softmax kernels): about 1e-6 per token on this model; 1e-4 is
asserted per token and the issue's 1e-3 for lm-eval's sums.
"""

import json
import types

import httpx
import pytest
import torch

from megacore.inference import InferenceConfig, TextGenerationController
from megacore.inference.generation_service import GenerationService, ServiceConfig
from megacore.inference.server import ServerConfig, create_app
from megacore.tokenizers import HuggingFaceTokenizer
from tests.inference import hf_tiny
from tests.inference.loopback import serve
from tests.inference.tiny_model import destroy_single_process, init_single_process

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

MODEL = "tiny-gpt2"
LP_TOL = 1e-4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    hf_dir = str(root / "hf")
    hf_model = hf_tiny.write_hf_model(hf_dir, chat_template=hf_tiny.CHATML)
    init_single_process()
    stop = None
    service = None
    try:
        model = hf_tiny.load_megacore_model(hf_dir, str(root / "megacore"))
        tokenizer = HuggingFaceTokenizer(hf_dir)
        controller = TextGenerationController(
            model, InferenceConfig(max_batch_size=8, vocab_size=tokenizer.vocab_size),
            detokenize=tokenizer.detokenize)
        service = GenerationService(controller, ServiceConfig(batch_wait_s=0.002)).start()
        app = create_app(service, tokenizer, ServerConfig(model_name=MODEL,
                                                           max_tokens_to_generate=32))
        url, stop = serve(app)
        yield types.SimpleNamespace(
            url=url, hf=hf_model, hf_dir=hf_dir, tokenizer=tokenizer, service=service,
            hf_tokenizer=transformers.AutoTokenizer.from_pretrained(hf_dir),
            http=httpx.Client(base_url=url, timeout=60))
    finally:
        if stop is not None:
            stop()
        if service is not None:
            service.stop()
        destroy_single_process()


def hf_logprobs(env, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 under transformers."""
    with torch.no_grad():
        logits = env.hf(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))], logp


def hf_greedy(env, ids, n):
    """Greedy continuation under transformers, ending after the end-of-text token."""
    ids, out = list(ids), []
    eos = env.hf_tokenizer.eos_token_id
    for _ in range(n):
        with torch.no_grad():
            token = int(env.hf(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        out.append(token)
        if token == eos:
            break
    return out


def post(env, path, **body):
    response = env.http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- the completions API -------------------------------------------------------------------
def test_every_prompt_form_gives_the_same_completions(env):
    texts = ["def parse(line):", "import os"]
    ids = [env.tokenizer.tokenize(t) for t in texts]
    expected = [env.tokenizer.detokenize(hf_greedy(env, i, 5)) for i in ids]
    forms = {"string": (texts[0], 1), "strings": (texts, 2), "ids": (ids[0], 1),
             "id lists": (ids, 2)}
    for name, (prompt, count) in forms.items():
        out = post(env, "/v1/completions", prompt=prompt, max_tokens=5, temperature=0.0)
        got = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
        assert got == expected[:count], name
        assert out["usage"]["prompt_tokens"] == sum(len(i) for i in ids[:count]), name


def test_max_tokens_0_with_echo_scores_the_prompt(env):
    ids = env.tokenizer.tokenize("for item in items: print(item)")
    reference, logp = hf_logprobs(env, ids)
    for prompt in (ids, [ids], "for item in items: print(item)"):
        out = post(env, "/v1/completions", prompt=prompt, max_tokens=0, echo=True, logprobs=5)
        choice = out["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"] == env.tokenizer.detokenize(ids)
        assert out["usage"]["completion_tokens"] == 0
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(reference, abs=LP_TOL)
        for position, top in enumerate(lp["top_logprobs"][1:]):
            best = torch.topk(logp[position], 5).values.tolist()
            assert sorted(top.values(), reverse=True) == pytest.approx(best, abs=LP_TOL)
    # Without logprobs the echo is only the text.
    out = post(env, "/v1/completions", prompt=ids, max_tokens=0, echo=True)
    assert out["choices"][0]["logprobs"] is None


def test_logprobs_of_generated_tokens_and_the_openai_limit(env):
    ids = env.tokenizer.tokenize("class Node:")
    out = post(env, "/v1/completions", prompt=ids, max_tokens=4, temperature=0.0, logprobs=5)
    lp = out["choices"][0]["logprobs"]
    generated = hf_greedy(env, ids, 4)
    reference, _ = hf_logprobs(env, ids + generated)
    assert lp["token_logprobs"] == pytest.approx(reference[len(ids) - 1:], abs=LP_TOL)
    assert all(len(top) == 5 for top in lp["top_logprobs"])
    assert all(max(top.values()) == pytest.approx(v) for top, v in
               zip(lp["top_logprobs"], lp["token_logprobs"]))
    too_many = env.http.post("/v1/completions", json={"prompt": ids, "logprobs": 6})
    assert too_many.status_code == 422 and too_many.json()["error"]["param"] == "logprobs"


@pytest.mark.parametrize("body, status, param, words", [
    ({"prompt": "a", "suffix": "b"}, 400, "suffix", "suffix is not supported"),
    ({"prompt": [[1, 2], []]}, 400, "prompt", "prompt[1] is empty"),
    ({"prompt": [5, 999999]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": [-1]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": [[1], "a"]}, 422, "prompt", "prompt"),
    ({"prompt": [1.5]}, 422, "prompt", "prompt"),
])
def test_bad_prompts_and_suffix_are_refused_by_name(env, body, status, param, words):
    response = env.http.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_the_openai_client(env):
    client = openai.OpenAI(base_url=env.url + "/v1", api_key="unused", max_retries=0)
    ids = env.tokenizer.tokenize("return self")
    greedy = env.tokenizer.detokenize(hf_greedy(env, ids, 6))
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert out.choices[0].text == greedy
    sampled = client.completions.create(model=MODEL, prompt="return self", max_tokens=6,
                                        n=2, seed=11)
    again = client.completions.create(model=MODEL, prompt="return self", max_tokens=6,
                                      n=2, seed=11)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    stop = greedy[2:4]
    cut = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="a", suffix="b")

    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a prime."}]
    prompt_ids = env.hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=True, return_dict=False)
    reply = hf_greedy(env, prompt_ids, 8)
    expected = env.tokenizer.detokenize([t for t in reply if t != env.tokenizer.eod])
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                          temperature=0)
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(prompt_ids)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# -- chat templates ------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? ünï"}],
]


def test_rendered_prompt_equals_transformers_apply_chat_template(env):
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            expected = env.hf_tokenizer.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=False)
            assert env.tokenizer.apply_chat_template(
                messages, add_generation_prompt=generation_prompt) == expected
        ids = env.hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
        assert env.tokenizer.apply_chat_template(messages, tokenize=True) == list(ids)


def test_chat_template_is_found_where_transformers_saves_it(tmp_path):
    """transformers 5 writes chat_template.jinja; the same template is read back."""
    source = tmp_path / "src"
    hf_tiny.write_hf_model(str(source), chat_template=hf_tiny.CHATML)
    loaded = transformers.AutoTokenizer.from_pretrained(str(source))
    loaded.save_pretrained(str(tmp_path / "saved"))
    ours = HuggingFaceTokenizer(str(tmp_path / "saved"))
    assert ours.chat_template == loaded.chat_template == hf_tiny.CHATML
    assert HuggingFaceTokenizer(str(source)).chat_template == hf_tiny.CHATML


@pytest.mark.parametrize("body, status, param", [
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages"),
    ({"messages": [{"role": "user"}]}, 422, "messages"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, 422, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]},
     422, "messages"),
    ({"messages": "hello"}, 422, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}, 400,
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": []}, 422, "tools"),
])
def test_chat_bodies_are_validated_strictly(env, body, status, param):
    response = env.http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_chat_content_parts_and_logprobs(env):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name"},
                                          {"type": "text", "text": "a prime."}]}]
    joined = [{"role": "user", "content": "Name\na prime."}]
    a = post(env, "/v1/chat/completions", messages=parts, max_tokens=4, temperature=0,
             logprobs=True, top_logprobs=3)
    b = post(env, "/v1/chat/completions", messages=joined, max_tokens=4, temperature=0)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    content = a["choices"][0]["logprobs"]["content"]
    assert len(content) == a["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 3 and
               c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"]) for c in content)


def test_chat_without_a_template_is_a_clear_400(tmp_path):
    from tests.inference.tiny_model import MERGE_FILE, VOCAB_FILE
    from megacore.tokenizers import build_tokenizer

    class _Service:  # the handler refuses before anything is generated
        max_batch_size = 8
        controller = types.SimpleNamespace(validate_request=None, max_sequence_length=64)

        def queued(self):
            return 0

    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB_FILE,
                                merge_file=MERGE_FILE)
    from fastapi.testclient import TestClient

    with TestClient(create_app(_Service(), tokenizer)) as client:
        response = client.post("/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and "no chat template" in error["message"]


# -- lm-evaluation-harness -----------------------------------------------------------------
def test_lm_eval_local_completions_matches_transformers(env):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=env.url + "/v1/completions", model=MODEL,
                             tokenizer=env.hf_dir, tokenizer_backend="huggingface",
                             max_length=64, max_retries=1, batch_size=2)
    assert lm.tokenized_requests  # the harness's default: token-id prompts, two per request
    pairs = [("def parse(line):", " return line"), ("import", " os"),
             ("The value of x is", " 42.")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i)
                                for i, pair in enumerate(pairs)], disable_tqdm=True)
    for (context, continuation), (ll, greedy) in zip(pairs, results):
        ctx = env.hf_tokenizer(context).input_ids
        whole = env.hf_tokenizer(context + continuation).input_ids
        reference, logp = hf_logprobs(env, whole)
        tail = reference[len(ctx) - 1:]
        assert abs(ll - sum(tail)) <= 1e-3
        argmax = [int(logp[i - 1].argmax()) == whole[i] for i in range(len(ctx), len(whole))]
        assert greedy == all(argmax)

    until = ["\n\n"]
    gens = lm.generate_until([Instance("generate_until", {}, (p, {"until": until,
                                                                  "max_gen_toks": 10}), i)
                              for i, p in enumerate(["class A:", "x = 1"])],
                             disable_tqdm=True)
    for prompt, text in zip(["class A:", "x = 1"], gens):
        ids = env.hf_tokenizer(prompt).input_ids
        reply = hf_greedy(env, ids, 10)
        expected = env.tokenizer.detokenize([t for t in reply if t != env.tokenizer.eod])
        for stop in until + [env.hf_tokenizer.eos_token]:
            expected = expected.split(stop)[0]
        assert text == expected


def test_lm_eval_local_chat_completions_matches_transformers(env):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion

    lm = LocalChatCompletion(base_url=env.url + "/v1/chat/completions", model=MODEL,
                             max_retries=1)
    messages = CONVERSATIONS[1]
    out = lm.generate_until([Instance("generate_until", {}, (
        JsonChatStr(json.dumps(messages)), {"until": ["\n\n"], "max_gen_toks": 8}), 0)],
        disable_tqdm=True)
    prompt_ids = env.hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=True, return_dict=False)
    reply = hf_greedy(env, prompt_ids, 8)
    expected = env.tokenizer.detokenize([t for t in reply if t != env.tokenizer.eod])
    assert out == [expected.split("\n\n")[0]]


def test_chat_responses_match_the_documented_models(env):
    """Chat answers and stream events validate against ``api_schema`` (extra fields
    forbidden), so the HTTP snapshot describes what is really sent."""
    from megacore.inference import api_schema as schema

    messages = [{"role": "user", "content": "hello"}]
    body = env.http.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}).json()
    schema.ChatCompletionResponse.model_validate(body)
    with env.http.stream("POST", "/v1/chat/completions", json={
            "messages": messages, "max_tokens": 4, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == schema.STREAM_END
    for event in events[:-1]:
        schema.ChatCompletionStreamChunk.model_validate(json.loads(event[len("data: "):]))
