"""The server under hostile or careless clients, on a real uvicorn over loopback.

* a streaming client that disconnects, or a client that stops waiting for its answer,
  cancels its generation: the engine's step counter stops advancing long before the
  request's budget, the slot is free again, and the disconnect is logged at info
  without a traceback;
* a request body that stops arriving gets 408 and its connection is closed;
* beyond ``max_concurrent_requests`` requests in progress the answer is 503;
* tokenization runs off the event loop: ``/health`` answers while a prompt is being
  tokenized (the tokenizer is held until it has).

Generation is slowed down (a sleep in every forward) so that a request is reliably in
progress while the test acts; nothing asserts a duration.
"""

import logging
import socket
import threading
import time
import types

import httpx
import pytest

from megacore.inference import InferenceConfig, TextGenerationController
from megacore.inference.generation_service import GenerationService, ServiceConfig
from megacore.inference.server import ServerConfig, create_app
from megacore.tokenizers import build_tokenizer
from tests.inference.loopback import serve
from tests.inference.tiny_model import (
    MERGE_FILE,
    VOCAB_FILE,
    build_chunks,
    destroy_single_process,
    init_single_process,
)

MAX_SEQ = 64
STEP_S = 0.02  # added to every forward


@pytest.fixture(scope="module")
def model():
    init_single_process()
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB_FILE,
                                merge_file=MERGE_FILE)
    try:
        yield types.SimpleNamespace(
            chunks=build_chunks("gpt", vocab=tokenizer.vocab_size, max_seq=MAX_SEQ,
                                layers=2),
            tokenizer=tokenizer)
    finally:
        destroy_single_process()


def _server(model, tokenizer=None, **config):
    """(url, controller, stop) of a server whose every forward takes STEP_S longer."""
    tokenizer = tokenizer or model.tokenizer
    controller = TextGenerationController(model.chunks, InferenceConfig(max_batch_size=4),
                                          detokenize=tokenizer.detokenize)
    forward = controller.runner.forward

    def slow_forward(*args, **kwargs):
        time.sleep(STEP_S)
        return forward(*args, **kwargs)

    controller.runner.forward = slow_forward
    service = GenerationService(controller, ServiceConfig(batch_wait_s=0.0)).start()
    url, stop_server = serve(create_app(service, tokenizer, ServerConfig(
        max_tokens_to_generate=MAX_SEQ, **config)))

    def stop():
        stop_server()
        service.stop()

    return url, controller, stop


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


LONG = {"prompt": "def f", "max_tokens": 60, "temperature": 1.0, "seed": 3, "stream": True}


def test_a_disconnected_stream_cancels_its_generation(model, caplog):
    url, controller, stop = _server(model)
    try:
        with caplog.at_level(logging.INFO):
            with httpx.Client(base_url=url, timeout=30) as client:
                batches = client.get("/health").json()["batches"]
                with client.stream("POST", "/v1/completions", json=LONG) as response:
                    assert response.status_code == 200
                    lines = response.iter_lines()
                    chunks = []
                    for line in lines:
                        if line.startswith("data:"):
                            chunks.append(line)
                        if len(chunks) == 3:
                            break  # leave with the stream unfinished: the client goes away
                # The generate call returns (its rows cancelled) and the slot is free.
                _wait_for(lambda: client.get("/health").json()["batches"] == batches + 1)
                _wait_for(lambda: client.get("/health").json()["requests_in_progress"] == 0)
            steps = controller.steps_run
            time.sleep(20 * STEP_S)  # room for 20 more steps if it were still running
            assert controller.steps_run == steps, "generation went on after the disconnect"
            assert steps < 30, f"{steps} steps ran for a request of 60 tokens"
        messages = [r for r in caplog.records if "cancelled the generation" in r.getMessage()]
        assert messages and messages[0].levelno == logging.INFO
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
        # The server goes on serving.
        with httpx.Client(base_url=url, timeout=30) as client:
            done = client.post("/v1/completions", json={**LONG, "stream": False,
                                                        "max_tokens": 3})
            assert done.status_code == 200
            assert done.json()["choices"][0]["finish_reason"] == "length"
    finally:
        stop()


def test_a_client_that_stops_waiting_cancels_its_generation(model, caplog):
    url, controller, stop = _server(model)
    try:
        with caplog.at_level(logging.INFO):
            batches = httpx.get(url + "/health").json()["batches"]
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and disconnects
                httpx.post(url + "/v1/completions", json={**LONG, "stream": False},
                           timeout=httpx.Timeout(30, read=10 * STEP_S))
            _wait_for(lambda: httpx.get(url + "/health").json()["batches"] == batches + 1)
            assert controller.steps_run < 30, f"{controller.steps_run} steps ran"
        assert [r for r in caplog.records if "cancelled the generation" in r.getMessage()
                and r.levelno == logging.INFO]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    finally:
        stop()


def test_a_stalled_upload_gets_408_and_is_closed(model):
    url, _, stop = _server(model, request_read_timeout_s=0.5)
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                         b'{"prompt": "a", ')
            received = b""
            while True:  # until the server closes the connection
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), received
        assert b'"param":"body"' in body and b"did not arrive within 0.5 s" in body
    finally:
        stop()


def test_requests_beyond_the_concurrency_limit_get_503(model):
    url, _, stop = _server(model, max_concurrent_requests=1)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            holder = threading.Thread(target=lambda: client.post("/v1/completions", json={
                **LONG, "stream": False, "max_tokens": 30}))
            holder.start()
            _wait_for(lambda: client.get("/health").json()["requests_in_progress"] == 1)
            refused = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
            assert refused.status_code == 503
            error = refused.json()["error"]
            assert error["type"] == "overloaded" and "--max-concurrent-requests" in \
                error["message"]
            holder.join(60)
            assert client.post("/v1/completions",
                               json={"prompt": "a", "max_tokens": 1}).status_code == 200
    finally:
        stop()


def test_tokenization_does_not_block_the_event_loop(model):
    entered, release = threading.Event(), threading.Event()

    class HeldTokenizer:
        """The real tokenizer, whose tokenize waits until the test releases it."""

        def __getattr__(self, name):
            return getattr(model.tokenizer, name)

        def tokenize(self, text):
            entered.set()
            release.wait(30)
            return model.tokenizer.tokenize(text)

    url, _, stop = _server(model, HeldTokenizer())
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            result = {}
            worker = threading.Thread(target=lambda: result.setdefault("r", client.put(
                "/api", json={"prompts": ["x " * 20], "tokens_to_generate": 1})))
            worker.start()
            assert entered.wait(20)
            # Tokenization is in progress; the event loop still answers.
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            release.set()
            worker.join(30)
            assert result["r"].status_code == 200
    finally:
        release.set()
        stop()
