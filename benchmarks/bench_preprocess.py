"""Preprocessing throughput: megacore's tool against the two paths Megatron users run.

All three read the same JSONL, use ``--workers`` processes, append the eod id and write
uint16 ``.bin``/``.idx`` through the same Megatron-format builder; the outputs must be
byte-identical (checked). Compared:

* megacore: ``tools/preprocess_data.py`` (tiktoken over the vocab.json/merges.txt, batched
  tasks returning numpy arrays);
* Megatron today: Megatron's pipeline shape (``Pool.imap(chunksize=32)`` over lines,
  ``json.loads`` + tokenize per line in each worker) with Hugging Face
  ``GPT2TokenizerFast`` built from the same two files;
* pure Python: the same with Hugging Face's slow ``GPT2Tokenizer`` (the algorithm of
  Megatron's legacy GPT-2 tokenizer); transformers >= 5 no longer has it, so there the
  plain-Python GPT-2 BPE of ``tests/tokenizers/gpt2_reference.py`` (same algorithm) is used.

Each path runs ``--repeats`` times, interleaved, and the fastest run counts (the machine is
shared, so the minimum is the least disturbed measurement). Start-up (tokenizer loading,
worker start) is inside the timing for every path.

    python benchmarks/bench_preprocess.py [--input ... --vocab-file ... --merge-file ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "corpus")

from megacore.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402


def _load_tool(name: str):
    """tools/ holds scripts, not an installed package: load the file itself."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


preprocess_data = _load_tool("preprocess_data")

_HF = None


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def pure_python_label() -> str:
    if _transformers_major() < 5:
        return "pure Python (HF slow)"
    # transformers 5 dropped its slow GPT-2 tokenizer; the test suite's reference is the
    # same algorithm (Megatron's legacy tokenizer) in plain Python.
    return "pure Python (legacy BPE)"


def _init_tokenizer(kind: str, vocab_file: str, merge_file: str) -> None:
    global _HF
    import transformers

    if kind == "slow" and _transformers_major() >= 5:
        sys.path.insert(0, ROOT)
        from tests.tokenizers.gpt2_reference import ReferenceGPT2

        _HF = ReferenceGPT2(vocab_file, merge_file)
        _HF.eod = _HF.encoder["<|endoftext|>"]
        return
    cls = transformers.GPT2TokenizerFast if kind == "fast" else transformers.GPT2Tokenizer
    if _transformers_major() >= 5:
        _HF = cls(vocab=vocab_file, merges=merge_file, model_max_length=10**9)
    else:
        _HF = cls(vocab_file=vocab_file, merges_file=merge_file, model_max_length=10**9)
    _HF.eod = _HF.convert_tokens_to_ids("<|endoftext|>")


def _encode_hf(line: str):
    ids = _HF.encode(json.loads(line)["text"])
    ids.append(_HF.eod)
    return ids, len(line)


def run_megatron_style(kind: str, args, prefix: str) -> int:
    """Megatron's preprocess loop with a Hugging Face tokenizer; returns tokens written."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    tokens = 0
    ctx = multiprocessing.get_context("fork")
    with open(args.input, encoding="utf-8") as f, ctx.Pool(
            args.workers, initializer=_init_tokenizer,
            initargs=(kind, args.vocab_file, args.merge_file)) as pool:
        for ids, _ in pool.imap(_encode_hf, f, chunksize=32):
            builder.add_document(ids, [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def run_megacore(args, prefix: str) -> int:
    flags = preprocess_data.get_args([
        "--input", args.input, "--output-prefix", prefix, "--tokenizer-type",
        "GPT2BPETokenizer", "--vocab-file", args.vocab_file, "--merge-file", args.merge_file,
        "--append-eod", "--workers", str(args.workers), "--log-interval", "1000000"])
    with open(os.devnull, "w") as quiet:
        out = preprocess_data.run(flags, log=quiet)["text"]
    os.replace(out + ".bin", prefix + ".bin")
    os.replace(out + ".idx", prefix + ".idx")
    return os.path.getsize(prefix + ".bin") // np.dtype(np.uint16).itemsize


def timed(fn, *fn_args):
    start = time.perf_counter()
    tokens = fn(*fn_args)
    return time.perf_counter() - start, tokens


def read(prefix: str):
    with open(prefix + ".bin", "rb") as f, open(prefix + ".idx", "rb") as g:
        return f.read(), g.read()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=os.path.join(SHARED, "sample.jsonl"))
    parser.add_argument("--vocab-file", default=os.path.join(SHARED, "vocab.json"))
    parser.add_argument("--merge-file", default=os.path.join(SHARED, "merges.txt"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=1,
                        help="runs of the pure-Python path (it takes seconds each)")
    args = parser.parse_args(argv)
    slow_label = pure_python_label()
    paths = {"megacore": lambda p: run_megacore(args, p),
             "megatron (HF fast)": lambda p: run_megatron_style("fast", args, p),
             slow_label: lambda p: run_megatron_style("slow", args, p)}
    best = {name: float("inf") for name in paths}
    outputs = {}
    tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(max(args.repeats, args.slow_repeats)):
            for name, fn in paths.items():
                limit = args.slow_repeats if name.startswith("pure") else args.repeats
                if repeat >= limit:
                    continue
                prefix = os.path.join(tmp, f"{len(outputs)}_{repeat}")
                seconds, tokens[name] = timed(fn, prefix)
                best[name] = min(best[name], seconds)
                outputs[name] = read(prefix)
    size_mb = os.path.getsize(args.input) / 2**20
    print(f"input {args.input}: {size_mb:.2f} MB, {tokens['megacore']:,} tokens, "
          f"--workers {args.workers}, best of {args.repeats} "
          f"({args.slow_repeats} for pure Python)")
    for name in paths:
        print(f"  {name:24s} {best[name]:7.3f} s  {tokens[name] / best[name]:>12,.0f} tokens/s "
              f" {size_mb / best[name]:6.2f} MB/s")
    identical = all(out == outputs["megacore"] for out in outputs.values())
    print(f"  .bin/.idx byte-identical across all three: {identical}")
    fast, slow = best["megatron (HF fast)"], best[slow_label]
    print(f"ratio megacore vs megatron (HF fast): {fast / best['megacore']:.1f}x (target >= 3x)")
    print(f"ratio megacore vs {slow_label}: {slow / best['megacore']:.1f}x (target >= 9x)")
    if not identical:
        sys.exit("outputs differ")


if __name__ == "__main__":
    main()
