"""Configuration shared by every dataset the builder makes (which data, how to split it,
where to cache the indices)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from megacore.datasets.split_and_blend import (
    Blend,
    Split,
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)

__all__ = ["BlendedMegatronDatasetConfig"]


@dataclass
class BlendedMegatronDatasetConfig:
    """Which data to read and how; checked on construction.

    Give exactly one of ``blend`` (with ``split``) or ``blend_per_split``, or set
    ``mock``.
    """

    random_seed: int
    """Seed of the document and sample shuffles. Change it to get another sample order
    from the same data; keep it to resume a run with the same order."""

    sequence_length: int
    """Tokens per sample (before the extra label token)."""

    blend: Optional[Blend] = None
    """``(prefixes, weights)`` from ``--data-path`` (see ``get_blend_from_list``); all
    splits are cut from these datasets according to ``split``."""

    blend_per_split: Optional[List[Optional[Blend]]] = None
    """Separate ``[train, valid, test]`` blends (``--train-data-path`` etc.); ``None``
    entries give no dataset for that split. Excludes ``blend``/``split``."""

    split: Optional[str] = None
    """``--split`` string such as ``"969,30,1"``; required with ``blend``."""

    split_matrix: Optional[List[Optional[Tuple[float, float]]]] = field(init=False,
                                                                         default=None)
    """Derived from ``split``: per-split ``(begin, end)`` fractions, ``None`` if empty."""

    path_to_cache: Optional[str] = None
    """Directory of the ``.npy`` index caches. Default: ``cache/<Class>_indices`` beside
    the first dataset. Set it when the data directory is read-only; it must be shared by
    all ranks (rank 0 writes, the others read)."""

    mmap_bin_files: bool = True
    """Memory-map the ``.bin`` files (turn off only for small data on slow mmap
    filesystems)."""

    mock: bool = False
    """Use synthetic data (``MockGPTDataset``) instead of files; nothing is cached."""

    tokenizer: Optional[Any] = None
    """Tokenizer whose ``eod`` (and ``pad``, if any) the samples use; part of the cache key."""

    mid_level_dataset_surplus: float = 0.005
    """Extra fraction of samples built per dataset of a weighted blend, so rounding in the
    blending never asks a dataset for more samples than it has."""

    def __post_init__(self) -> None:
        if self.sequence_length <= 0:
            raise ValueError(f"sequence_length must be positive, got {self.sequence_length}")
        if self.mid_level_dataset_surplus < 0:
            raise ValueError("mid_level_dataset_surplus must be non-negative")
        if self.mock:
            self.split = self.split or "1,1,1"
        elif self.blend_per_split is not None:
            if self.blend is not None or self.split is not None:
                raise ValueError("give either blend_per_split or blend with split, not both")
            if len(self.blend_per_split) != len(Split):
                raise ValueError(f"blend_per_split needs {len(Split)} entries "
                                 f"(train, valid, test), got {len(self.blend_per_split)}")
            return
        elif self.blend is None:
            raise ValueError("no data: set blend (--data-path), blend_per_split "
                             "(--train/valid/test-data-path) or mock")
        elif self.split is None:
            raise ValueError("blend (--data-path) needs split (--split), e.g. '969,30,1'")
        self.split_matrix = convert_split_vector_to_split_matrix(
            parse_and_normalize_split(self.split))
