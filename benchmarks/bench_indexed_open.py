"""Time to open (and fully validate) a large .idx: ``IndexedDataset(prefix)``.

    python benchmarks/bench_indexed_open.py [--sequences 20000000] [--dir /tmp]

Writes a synthetic uint16 dataset of N sequences (lengths 1..8, one document each:
an .idx of 34 + 20 N bytes), then opens it a few times and prints the best time.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from megacore.datasets.indexed_dataset import IndexedDataset, encode_index


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=20_000_000)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    prefix = os.path.join(args.dir, f"bench_open_{args.sequences}")
    lengths = (np.arange(args.sequences, dtype=np.int64) % 8 + 1).astype(np.int32)
    with open(prefix + ".idx", "wb") as f:
        f.write(encode_index(lengths, np.arange(args.sequences + 1), np.uint16))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)
    try:
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            IndexedDataset(prefix)
            best = min(best, time.perf_counter() - start)
        size_mb = os.path.getsize(prefix + ".idx") / 2**20
        print(f"{args.sequences} sequences, .idx {size_mb:.0f} MiB: open+validate "
              f"{best:.3f} s (best of {args.repeat})")
    finally:
        os.remove(prefix + ".idx")
        os.remove(prefix + ".bin")


if __name__ == "__main__":
    main()
