#!/usr/bin/env python
"""Server behaviour under a 1 MB prompt and a disconnecting stream (not run by tests).

1. The longest event-loop stall (what delays ``/health`` and every other request) while
   a ~1 MB prompt is tokenized, with tokenization in a worker thread (megacore) and, as
   the baseline, on the event loop (``asyncio.to_thread`` replaced by a direct call,
   which is what the server did before).
2. CPU use of the server process while a stream generates and after its client
   disconnects (the generation is cancelled, so the process returns to idle).

    python benchmarks/bench_server_hardening.py

A tiny GPT (2 layers, hidden 32) with the demo GPT-2 vocabulary on one process.
"""

import asyncio
import contextlib
import os
import sys
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megacore.inference import InferenceConfig, TextGenerationController  # noqa: E402
from megacore.inference import server as server_module  # noqa: E402
from megacore.inference.generation_service import GenerationService, ServiceConfig  # noqa: E402
from megacore.inference.server import ServerConfig, create_app  # noqa: E402
from megacore.tokenizers import build_tokenizer  # noqa: E402
from tests.inference.loopback import serve  # noqa: E402
from tests.inference.tiny_model import (  # noqa: E402
    MERGE_FILE,
    VOCAB_FILE,
    build_chunks,
    init_single_process,
)


def loop_stall_during_big_prompt(url: str, stalls) -> float:
    """Longest event-loop stall (s) while the server handles a 1 MB prompt, measured
    inside the server (a task that wakes every 5 ms; client-side timings would mix in
    this process's other threads)."""
    prompt = ("The quick brown fox jumps over the lazy dog. " * 23000)[:1_000_000]
    stalls.clear()
    response = httpx.put(url + "/api", json={"prompts": [prompt], "tokens_to_generate": 1},
                         timeout=120)
    assert response.status_code == 400  # far too long for the model: refused after tokenizing
    return max(stalls, default=0.0)


def watch_the_loop(app, stalls) -> None:
    """Record how late a 5 ms sleep on the server's event loop wakes up."""
    original = app.router.lifespan_context

    async def tick():
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            stalls.append(now - last - 0.005)
            last = now

    @contextlib.asynccontextmanager
    async def lifespan(application):
        task = asyncio.get_running_loop().create_task(tick())
        async with original(application):
            yield
        task.cancel()

    app.router.lifespan_context = lifespan


def cpu_share(seconds: float) -> float:
    """Fraction of one core this process used over the next ``seconds``."""
    start_cpu, start = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    return (time.process_time() - start_cpu) / (time.perf_counter() - start)


def main():
    init_single_process()
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB_FILE,
                                merge_file=MERGE_FILE)
    chunks = build_chunks("gpt", vocab=tokenizer.vocab_size, max_seq=2048, layers=2)
    controller = TextGenerationController(chunks, InferenceConfig(max_batch_size=4),
                                          detokenize=tokenizer.detokenize)
    service = GenerationService(controller, ServiceConfig()).start()
    app = create_app(service, tokenizer, ServerConfig(max_request_bytes=2 << 20,
                                                      max_tokens_to_generate=2000))
    stalls = []
    watch_the_loop(app, stalls)
    url, stop = serve(app)

    off_loop = loop_stall_during_big_prompt(url, stalls)
    real_to_thread = asyncio.to_thread

    async def inline(fn, *args, **kwargs):  # the old behaviour: on the event loop
        return fn(*args, **kwargs)

    server_module.asyncio.to_thread = inline
    on_loop = loop_stall_during_big_prompt(url, stalls)
    server_module.asyncio.to_thread = real_to_thread
    print(f"longest event-loop stall during a 1 MB prompt: {off_loop * 1000:.0f} ms "
          f"(tokenizing off the loop) vs {on_loop * 1000:.0f} ms (on the loop)")

    body = {"prompt": "def f", "max_tokens": 2000, "temperature": 1.0, "seed": 1,
            "stream": True}
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines)
            busy = cpu_share(1.0)
        steps = controller.steps_run
        time.sleep(0.5)
        idle = cpu_share(1.0)
        after = controller.steps_run - steps
    print(f"server CPU: {busy:.2f} cores while streaming, {idle:.2f} cores after the client "
          f"disconnected ({after} engine steps after the disconnect)")
    stop()
    service.stop()


if __name__ == "__main__":
    main()
