"""Build the train/valid/test datasets from a config: the entry point for training.

``BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, config).build()``
returns ``[train, valid, test]`` (``None`` where a split has no data), where ``sizes`` are
the samples wanted per split (``None``: one epoch). Cases, as in Megatron-Core:

* one ``--data-path`` prefix: each split is a :class:`GPTDataset` cut by ``--split``;
* weighted prefixes: each prefix is split, built with ``ceil(size * weight * (1 +
  surplus))`` samples, and the splits are mixed by :class:`BlendedDataset`;
* prefixes without weights: each is used for one epoch, mixed in proportion to size;
* ``blend_per_split``: separate paths per split (``--train-data-path`` etc.);
* ``mock``: synthetic data.

Every dataset is built on rank 0 first while the other ranks wait, then loaded from
rank 0's cache on the others (:func:`build_on_rank_zero_first`).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional, Sequence, Type

import numpy as np

from megacore.datasets.blended_dataset import BlendedDataset
from megacore.datasets.blended_megatron_dataset_config import (
    BlendedMegatronDatasetConfig,
)
from megacore.datasets.index_cache import build_on_rank_zero_first
from megacore.datasets.mock_dataset import MockGPTDataset
from megacore.datasets.split_and_blend import Blend, Split, split_range

__all__ = ["BlendedMegatronDatasetBuilder"]

logger = logging.getLogger(__name__)

Sizes = Sequence[Optional[int]]


class BlendedMegatronDatasetBuilder:
    """Args:
        cls: the dataset class (``GPTDataset``; ``MockGPTDataset`` is used for mock data).
        sizes: samples wanted for train, valid, test (``None`` = one epoch).
        is_built_on_rank: whether this rank needs the datasets (others get ``None`` but
            still join the barriers).
        config: the dataset configuration.
    """

    def __init__(self, cls: Type, sizes: Sizes, is_built_on_rank: Callable[[], bool],
                 config: BlendedMegatronDatasetConfig) -> None:
        if len(sizes) != len(Split):
            raise ValueError(f"sizes needs {len(Split)} entries (train, valid, test)")
        self.cls = MockGPTDataset if config.mock else cls
        self.sizes = list(sizes)
        self.is_built_on_rank = is_built_on_rank
        self.config = config

    def build(self) -> List[Optional[object]]:
        """``[train, valid, test]`` datasets."""
        config = self.config
        if config.mock:
            return self._build_splits(None, config.split_matrix, self.sizes)
        if config.blend is not None:
            return self._build_blend(config.blend, config.split_matrix, self.sizes)
        datasets: List[Optional[object]] = []
        for split, blend in zip(Split, config.blend_per_split):
            if blend is None:
                if self.sizes[split.value]:
                    raise ValueError(f"{self.sizes[split.value]} {split.name} samples were "
                                     f"requested but no {split.name} data path was given")
                datasets.append(None)
                continue
            only_this = [(0.0, 1.0) if s == split else None for s in Split]
            sizes = [self.sizes[s.value] if s == split else None for s in Split]
            datasets.append(self._build_blend(blend, only_this, sizes)[split.value])
        return datasets

    def _build_blend(self, blend: Blend, split_matrix, sizes: Sizes) -> List[Optional[object]]:
        prefixes, weights = blend
        if len(prefixes) == 1:
            return self._build_splits(prefixes[0], split_matrix, sizes)
        if weights is None:
            targets = buffers = [[None] * len(Split) for _ in prefixes]
        else:
            targets = [_samples_per_split(w, sizes, 0.0) for w in weights]
            buffers = [_samples_per_split(w, sizes, self.config.mid_level_dataset_surplus)
                       for w in weights]
        per_prefix = [self._build_splits(p, split_matrix, b) for p, b in zip(prefixes, buffers)]
        blended: List[Optional[object]] = []
        for split in Split:
            parts = [datasets[split.value] for datasets in per_prefix]
            if split_matrix[split.value] is None or any(p is None for p in parts):
                blended.append(None)
                continue
            size = sizes[split.value]
            if weights is not None:
                if size is None:
                    raise ValueError(f"weighted --data-path needs a sample count for the "
                                     f"{split.name} split")
                split_weights, size = weights, sum(t[split.value] for t in targets)
            else:
                split_weights = [len(p) for p in parts]
                size = None if size is None else min(size, sum(split_weights))
            blended.append(self._build_rank_zero_first(
                lambda: BlendedDataset(parts, split_weights, size, self.config)))
        return blended

    def _build_splits(self, dataset_path: Optional[str], split_matrix,
                      sizes: Sizes) -> List[Optional[object]]:
        low_level = self.cls.build_low_level_dataset(dataset_path, self.config)
        num_elements = self.cls.numel_low_level_dataset(low_level)
        datasets: List[Optional[object]] = []
        for split in Split:
            begin, end = split_range(split_matrix[split.value], num_elements)
            wanted = sizes[split.value]
            if end <= begin:
                if wanted:
                    raise ValueError(
                        f"the {split.name} split of {dataset_path or 'mock data'} is empty "
                        f"(--split {self.config.split} gives it sequences [{begin}, {end}) of "
                        f"{num_elements}) but {wanted} {split.name} samples were requested")
                datasets.append(None)
                continue
            indices = np.arange(begin, end, dtype=np.int32)
            datasets.append(self._build_rank_zero_first(
                lambda: self.cls(low_level, dataset_path, indices, wanted, split, self.config)))
        return datasets

    def _build_rank_zero_first(self, build: Callable[[], object]) -> Optional[object]:
        return build_on_rank_zero_first(lambda: build() if self.is_built_on_rank() else None)


def _samples_per_split(weight: float, sizes: Sizes, surplus: float) -> List[Optional[int]]:
    return [None if size is None else int(math.ceil(size * weight * (1 + surplus)))
            for size in sizes]
