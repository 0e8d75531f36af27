"""Index helpers for the GPT and blended datasets: C++ when built, numpy otherwise.

The compiled versions live in :mod:`megacore_cpp` (built by ``pip install``). This module
is what the datasets call: :func:`build_sample_idx` picks the int32 or int64 variant the
way Megatron does, and every function falls back to the numpy reference below when the
extension is missing (an unbuilt source checkout still works, only slower). The numpy
references are written independently of the C++ loops (the sample index is computed with
``searchsorted`` over document end positions rather than by walking), so the tests that
compare the two check the algorithm, not a transcription.

Semantics: ``docs/ARCHITECTURE.md``, "Data formats and sample order".
"""

from __future__ import annotations

import logging
import math

import numpy as np

try:
    import megacore_cpp
except ImportError:  # source checkout without the compiled extension
    megacore_cpp = None

__all__ = [
    "build_blending_indices",
    "build_blending_indices_numpy",
    "build_exhaustive_blending_indices",
    "build_exhaustive_blending_indices_numpy",
    "build_sample_idx",
    "build_sample_idx_numpy",
    "compiled_helpers_available",
    "sample_idx_needs_int64",
]

logger = logging.getLogger(__name__)

_INT32_MAX = np.iinfo(np.int32).max


def compiled_helpers_available() -> bool:
    """True when the C++ extension ``megacore_cpp`` is importable."""
    return megacore_cpp is not None


def sample_idx_needs_int64(sizes: np.ndarray, document_idx: np.ndarray) -> bool:
    """Whether sample-index entries may exceed int32: they hold positions in
    ``document_idx`` and token offsets inside one sequence."""
    largest_size = int(sizes.max()) if len(sizes) else 0
    return max(len(document_idx), largest_size) > _INT32_MAX


def build_sample_idx(sizes: np.ndarray, document_idx: np.ndarray, seq_length: int,
                     num_epochs: int, tokens_per_epoch: int,
                     drop_last_partial_sequence: bool = True,
                     add_extra_token_to_sequence: int = 1) -> np.ndarray:
    """Where each sample starts: ``[num_samples + 1, 2]`` rows of (position in
    ``document_idx``, token offset in that document).

    Sample ``k`` runs from row ``k`` to row ``k+1`` plus ``add_extra_token_to_sequence``
    tokens. Args mirror Megatron's ``helpers.build_sample_idx``; ``sizes`` and
    ``document_idx`` must be int32.
    """
    if sizes.dtype != np.int32 or document_idx.dtype != np.int32:
        raise TypeError(f"build_sample_idx needs int32 sizes and document_idx, got "
                        f"{sizes.dtype} and {document_idx.dtype}")
    args = (sizes, document_idx, int(seq_length), int(num_epochs), int(tokens_per_epoch),
            bool(drop_last_partial_sequence), int(add_extra_token_to_sequence))
    if megacore_cpp is None:
        return build_sample_idx_numpy(*args)
    if sample_idx_needs_int64(sizes, document_idx):
        return megacore_cpp.build_sample_idx_int64(*args)
    return megacore_cpp.build_sample_idx_int32(*args)


def num_samples_in_stream(total_tokens: int, seq_length: int, extra: int,
                          drop_last: bool) -> int:
    """Samples of ``seq_length`` (+``extra`` overlapping tokens) in ``total_tokens``."""
    if drop_last:
        return (total_tokens - extra) // seq_length
    # Megatron rounds up in single precision; matching it keeps caches interchangeable.
    return int(math.ceil(np.float32(total_tokens - extra) / np.float32(seq_length)))


def build_sample_idx_numpy(sizes: np.ndarray, document_idx: np.ndarray, seq_length: int,
                           num_epochs: int, tokens_per_epoch: int,
                           drop_last_partial_sequence: bool = True,
                           add_extra_token_to_sequence: int = 1) -> np.ndarray:
    """Numpy reference of :func:`build_sample_idx` (same result, int64 rows cast down).

    Sample ``k-1`` ends (exclusive) at flat token ``e = k * seq_length + extra``. Row ``k``
    is the first document whose end is at or after ``e`` (so a sample that ends exactly at
    a document end points into that document), with offset ``e - doc_start - extra``.
    """
    extra = int(add_extra_token_to_sequence)
    if seq_length <= 0 or num_epochs <= 0 or tokens_per_epoch <= 0:
        raise ValueError("seq_length, num_epochs and tokens_per_epoch must be positive")
    num_samples = num_samples_in_stream(int(num_epochs) * int(tokens_per_epoch), seq_length,
                                        extra, drop_last_partial_sequence)
    doc_sizes = sizes[document_idx].astype(np.int64)
    doc_ends = np.cumsum(doc_sizes)
    doc_starts = doc_ends - doc_sizes
    sample_ends = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length + extra
    position = np.searchsorted(doc_ends, sample_ends, side="left")
    offset = np.empty_like(sample_ends)
    inside = position < len(doc_ends)
    offset[inside] = sample_ends[inside] - doc_starts[position[inside]] - extra
    if not inside.all():
        if inside[:-1].size and not inside[:-1].all():
            raise ValueError("build_sample_idx: the documents hold fewer tokens than "
                             "num_epochs * tokens_per_epoch says")
        # The final partial sample runs past the stream: pin it to the last document.
        position[-1] = len(doc_ends) - 1
        offset[-1] = doc_sizes[-1] - extra
    rows = np.zeros((num_samples + 1, 2), dtype=np.int64)
    rows[1:, 0] = position
    rows[1:, 1] = offset
    return rows.astype(np.int64 if sample_idx_needs_int64(sizes, document_idx) else np.int32)


def build_blending_indices(dataset_index: np.ndarray, dataset_sample_index: np.ndarray,
                           weights: np.ndarray, num_datasets: int, size: int,
                           verbose: bool) -> None:
    """Fill ``dataset_index`` (int16) and ``dataset_sample_index`` (int64) in place.

    Position ``s`` takes the dataset furthest behind its share
    (``weights[d] * max(s, 1) - taken[d]`` largest, ties to the lowest index).
    """
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if megacore_cpp is None:
        build_blending_indices_numpy(dataset_index, dataset_sample_index, weights,
                                     num_datasets, size, verbose)
    else:
        megacore_cpp.build_blending_indices(dataset_index, dataset_sample_index, weights,
                                            int(num_datasets), int(size), bool(verbose))


def build_exhaustive_blending_indices(dataset_index: np.ndarray,
                                      dataset_sample_index: np.ndarray, sizes: np.ndarray,
                                      num_datasets: int) -> None:
    """Like :func:`build_blending_indices` with weights ``sizes / sum(sizes)``, taking
    exactly ``sizes[d]`` samples from dataset ``d`` (output length ``sum(sizes)``)."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    if megacore_cpp is None:
        build_exhaustive_blending_indices_numpy(dataset_index, dataset_sample_index, sizes,
                                                num_datasets)
    else:
        megacore_cpp.build_exhaustive_blending_indices(dataset_index, dataset_sample_index,
                                                       sizes, int(num_datasets))


def build_blending_indices_numpy(dataset_index: np.ndarray, dataset_sample_index: np.ndarray,
                                 weights: np.ndarray, num_datasets: int, size: int,
                                 verbose: bool = False) -> None:
    """Numpy reference of :func:`build_blending_indices` (one Python step per sample)."""
    weights = np.asarray(weights, dtype=np.float64)[:num_datasets]
    taken = np.zeros(num_datasets, dtype=np.int64)
    for s in range(size):
        # argmax returns the first maximum: ties go to the lowest index.
        d = int(np.argmax(weights * max(float(s), 1.0) - taken.astype(np.float64)))
        dataset_index[s] = d
        dataset_sample_index[s] = taken[d]
        taken[d] += 1
    if verbose:
        logger.info("blending ratios: weights %s achieved %s", weights.tolist(),
                    (taken / max(size, 1)).tolist())


def build_exhaustive_blending_indices_numpy(dataset_index: np.ndarray,
                                            dataset_sample_index: np.ndarray,
                                            sizes: np.ndarray, num_datasets: int) -> None:
    """Numpy reference of :func:`build_exhaustive_blending_indices`."""
    sizes = np.asarray(sizes, dtype=np.int64)[:num_datasets]
    weights = sizes / float(sizes.sum())
    taken = np.zeros(num_datasets, dtype=np.int64)
    for s in range(int(sizes.sum())):
        error = weights * max(float(s), 1.0) - taken.astype(np.float64)
        error[taken >= sizes] = -np.inf  # spent datasets leave the candidate set
        d = int(np.argmax(error))
        dataset_index[s] = d
        dataset_sample_index[s] = taken[d]
        taken[d] += 1

