"""Concatenating indexed datasets (``tools/merge_datasets.py``): find the pairs, refuse an
output among the inputs, copy."""

from __future__ import annotations

import os
from typing import List, Sequence

from megacore.datasets.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    data_file_path,
    index_file_path,
)


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


def check_output_outside_inputs(input_dir: str, output_prefix: str) -> None:
    """Refuse an output in the input directory: it would be merged into itself later."""
    output_dir = os.path.dirname(os.path.abspath(output_prefix))
    if os.path.realpath(output_dir) == os.path.realpath(input_dir):
        raise IndexedDatasetError(
            f"--output-prefix {output_prefix} lies in the --input directory {input_dir}: the "
            f"merged dataset would become one of the inputs of the next merge (every "
            f"document twice); write it to another directory")


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
