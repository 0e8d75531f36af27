"""build_sample_idx: the C++ helper against the numpy versions, on 1e8 tokens.

The corpus is synthetic: documents with lengths drawn uniformly from [1, 2 * mean), a
shuffled document index, and GPT-style sample windows. Compared, with equal outputs
checked:

* C++ (``megacore_cpp.build_sample_idx_int32``, what the datasets use);
* the numpy fallback shipped in ``megacore.datasets.helpers`` (vectorized: searchsorted
  over document end positions), used when the extension is not built;
* a numpy walk (one Python step per sample and per document, the C++ loop transcribed),
  which is what a straightforward Python port costs.

    python benchmarks/bench_sample_idx.py [--tokens 1e8 --mean-doc 1000 --seq-length 2048]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import megacore_cpp
from megacore.datasets.helpers import build_sample_idx_numpy


def numpy_walk(sizes, document_idx, seq_length, num_epochs, tokens_per_epoch, drop_last=True,
               extra=1):
    """The C++ loop in Python over numpy arrays (drop_last only, for the benchmark)."""
    num_samples = (num_epochs * tokens_per_epoch - extra) // seq_length
    rows = np.zeros((num_samples + 1, 2), dtype=np.int32)
    position, offset = 0, 0
    for k in range(1, num_samples + 1):
        needed = seq_length + extra
        while True:
            left = int(sizes[document_idx[position]]) - offset
            if needed <= left:
                offset += needed - extra
                break
            needed -= left
            position += 1
            offset = 0
        rows[k] = position, offset
    return rows


def best_of(repeats, fn, *args):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=1e8)
    parser.add_argument("--mean-doc", type=int, default=1000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    num_docs = int(args.tokens // args.mean_doc)
    sizes = rng.integers(1, 2 * args.mean_doc, size=num_docs).astype(np.int32)
    document_idx = np.arange(num_docs, dtype=np.int32)
    rng.shuffle(document_idx)
    tokens = int(sizes.sum(dtype=np.int64))
    call = (sizes, document_idx, args.seq_length, 1, tokens, True, 1)
    cpp, expected = best_of(args.repeats, megacore_cpp.build_sample_idx_int32, *call)
    vectorized, result = best_of(args.repeats, build_sample_idx_numpy, *call)
    assert np.array_equal(result, expected), "numpy fallback differs"
    walk, result = best_of(1, numpy_walk, *call)
    assert np.array_equal(result, expected), "numpy walk differs"
    print(f"{tokens:,} tokens, {num_docs:,} documents, {len(expected) - 1:,} samples of "
          f"{args.seq_length}; outputs identical")
    print(f"  C++                      {cpp * 1e3:9.2f} ms")
    print(f"  numpy fallback (vector)  {vectorized * 1e3:9.2f} ms")
    print(f"  numpy walk (Python loop) {walk * 1e3:9.2f} ms")
    print(f"ratio C++ vs numpy walk:     {walk / cpp:.0f}x (target >= 20x)")
    print(f"ratio C++ vs numpy fallback: {vectorized / cpp:.1f}x")


if __name__ == "__main__":
    main()
