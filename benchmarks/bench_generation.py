"""Text generation on CPU: KV-cache decoding vs recomputation, and the HTTP server.

Prints two tables:

1. Decode throughput (generated tokens/s) of ``TextGenerationController`` on a small GPT
   with the KV cache (prefill, then one token per step) against recomputing the whole
   sequence every step (``use_kv_cache=False``), 256 new tokens after a 16-token prompt,
   batch 1 and batch 8. Greedy outputs of both paths are checked equal first.
   Target: cache >= 5x recompute.
2. The REST server (real uvicorn on a loopback port, ``PUT /api``, 16 new tokens per
   request): requests/s and p50/p99 latency with 1 and 8 concurrent clients, side by
   side (8 clients share batches).

Run: ``python benchmarks/bench_generation.py [--quick] [--layers 6 --hidden 256]`` (about a
minute on 2 cores). The default model is the project's CPU reference point (6 layers,
hidden 256, shared/CPU_NOTES.md); ``--layers 4 --hidden 128`` shows the overhead-bound
extreme.

At batch 1 the cached step of this 2.4 M-parameter model is dominated by fixed per-op
overhead (~1.5 ms per token for 4 layers, mostly module and autograd-function dispatch),
so the speed-up grows with model size and batch: measure both.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import uvicorn  # noqa: E402

from megacore import parallel_state as ps  # noqa: E402
from megacore.inference import (  # noqa: E402
    GenerationRequest,
    InferenceConfig,
    SamplingParams,
    TextGenerationController,
)
from megacore.inference.generation_service import GenerationService  # noqa: E402
from megacore.inference.server import ServerConfig, create_app  # noqa: E402
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec  # noqa: E402
from megacore.tensor_parallel import model_parallel_manual_seed  # noqa: E402
from megacore.tokenizers import build_tokenizer  # noqa: E402
from megacore.transformer import TransformerConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "data")


def build_model(vocab: int, layers: int, hidden: int, max_seq: int) -> GPTModel:
    config = TransformerConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4,
                               ffn_hidden_size=4 * hidden, hidden_dropout=0.0,
                               attention_dropout=0.0)
    model_parallel_manual_seed(1234)
    return GPTModel(config, get_gpt_layer_local_spec(), vocab, max_sequence_length=max_seq)


# -- 1. decode throughput ----------------------------------------------------------------------
def decode_tokens_per_s(model, batch: int, new_tokens: int, cache: bool, repeats: int):
    controller = TextGenerationController(model, InferenceConfig(max_batch_size=batch,
                                                                 use_kv_cache=cache))
    g = torch.Generator().manual_seed(0)
    requests = [GenerationRequest(torch.randint(0, 1000, (16,), generator=g).tolist(),
                                  new_tokens, SamplingParams(temperature=0.0))
                for _ in range(batch)]
    best, tokens = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        results = controller.generate(requests)
        best = min(best, time.perf_counter() - start)
        tokens = [r.generated_tokens for r in results]
    return batch * new_tokens / best, tokens


def bench_decode(model, new_tokens: int, repeats: int) -> None:
    print(f"\n1. decode throughput, {new_tokens} new tokens after a 16-token prompt "
          "(best of %d runs)" % repeats)
    print(f"{'batch':>5} | {'KV cache tok/s':>15} | {'recompute tok/s':>15} | {'speed-up':>8}")
    for batch in (1, 8):
        cached, a = decode_tokens_per_s(model, batch, new_tokens, True, repeats)
        recomputed, b = decode_tokens_per_s(model, batch, new_tokens, False, 1)
        assert a == b, "cache and recompute disagree"
        print(f"{batch:>5} | {cached:>15.1f} | {recomputed:>15.1f} | {cached / recomputed:>7.1f}x")


# -- 2. server -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(port: int, concurrency: int, requests: int, tokens: int):
    latencies = []

    def call(i, client):
        body = {"prompts": [f"def function_{i % 7}(x):"], "tokens_to_generate": tokens,
                "temperature": 0.0, "no_log": True}
        start = time.perf_counter()
        response = client.put("/api", json=body)
        response.raise_for_status()
        return time.perf_counter() - start

    clients = [httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
               for _ in range(concurrency)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda i: call(i, clients[i % concurrency]), range(requests)))
    elapsed = time.perf_counter() - start
    for client in clients:
        client.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    return requests / elapsed, statistics.median(latencies) * 1e3, p99 * 1e3


def bench_server(model, tokenizer, requests: int, tokens: int) -> None:
    controller = TextGenerationController(model, InferenceConfig(max_batch_size=8),
                                          detokenize=tokenizer.detokenize)
    service = GenerationService(controller).start()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, tokenizer, ServerConfig()),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        _load(port, 2, 8, tokens)  # warm-up
        rows = {c: _load(port, c, requests, tokens) for c in (1, 8)}
    finally:
        server.should_exit = True
        thread.join(30)
        service.stop()
    print(f"\n2. server, PUT /api, {tokens} new tokens, {requests} requests per run")
    print(f"{'':>14} | {'concurrency 1':>14} | {'concurrency 8':>14}")
    for i, (name, fmt) in enumerate((("requests/s", "{:.1f}"), ("p50 latency ms", "{:.1f}"),
                                     ("p99 latency ms", "{:.1f}"))):
        print(f"{name:>14} | {fmt.format(rows[1][i]):>14} | {fmt.format(rows[8][i]):>14}")
    print(f"batches run: {service.batches_run}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and requests")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = tempfile.mktemp(prefix="megacore-bench-")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=os.path.join(DATA, "vocab.json"),
                                merge_file=os.path.join(DATA, "merges.txt"))
    with torch.no_grad():
        model = build_model(tokenizer.vocab_size, layers=args.layers, hidden=args.hidden,
                            max_seq=512)
        print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {tokenizer.vocab_size}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"fp32, 1 thread")
        bench_decode(model, 256, 1 if args.quick else 3)
        bench_server(model, tokenizer, 32 if args.quick else 96, 16)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
