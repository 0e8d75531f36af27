"""Concatenate indexed datasets into one (Megatron's ``tools/merge_datasets.py`` flags).

    python tools/merge_datasets.py --input out/parts --output-prefix out/merged_text_document

merges every ``.bin``/``.idx`` pair in ``--input`` (in file-name order) into
``{output-prefix}.bin/.idx``. Documents keep their order; the ``.bin`` bytes are copied
verbatim, so all inputs must share one dtype. The output appears only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from megacore.datasets.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    data_file_path,
    index_file_path,
)


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True,
                        help="directory holding the .bin/.idx pairs to merge")
    parser.add_argument("--output-prefix", required=True,
                        help="path of the merged dataset, without .bin/.idx")
    parser.add_argument("--multimodal", action="store_true",
                        help="not supported: multimodal datasets cannot be merged")
    return parser.parse_args(argv)


def find_prefixes(directory: str) -> List[str]:
    """Prefixes with both files in ``directory``, sorted by name; errors name strays."""
    if not os.path.isdir(directory):
        raise IndexedDatasetError(f"{directory}: not a directory")
    names = sorted(os.listdir(directory))
    prefixes = []
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext not in (".bin", ".idx"):
            continue
        other = stem + (".idx" if ext == ".bin" else ".bin")
        if other not in names:
            raise IndexedDatasetError(f"{os.path.join(directory, name)}: no matching {other}")
        if ext == ".idx":
            prefixes.append(os.path.join(directory, stem))
    if not prefixes:
        raise IndexedDatasetError(f"{directory}: no .bin/.idx pairs to merge")
    return prefixes


def merge(prefixes: Sequence[str], output_prefix: str) -> None:
    """Write the concatenation of ``prefixes`` to ``output_prefix``."""
    dtype = IndexedDataset(prefixes[0]).dtype
    builder = IndexedDatasetBuilder(data_file_path(output_prefix), dtype=dtype)
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(index_file_path(output_prefix))
    except BaseException:
        builder.discard()
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args(argv)
    if args.multimodal:
        print("error: merging multimodal datasets is not supported", file=sys.stderr)
        return 1
    try:
        prefixes = find_prefixes(args.input)
        output_dir = os.path.dirname(os.path.abspath(args.output_prefix))
        os.makedirs(output_dir, exist_ok=True)
        merge(prefixes, args.output_prefix)
    except IndexedDatasetError as err:
        print(f"error: {err}\nerror: no output written", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
