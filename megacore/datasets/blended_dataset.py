"""A weighted mixture of datasets: sample ``i`` comes from dataset ``dataset_index[i]``.

The interleaving is deterministic greedy proportional sampling
(:func:`megacore.datasets.helpers.build_blending_indices`): at every position the dataset
furthest behind its share is taken, so any prefix of the blend is as close to the
weights as integers allow. Weights are normalized and logged. With ``size=None`` every
dataset is used exactly once, in proportion to its length (exhaustive blending).
"""

from __future__ import annotations

import json
import logging
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from megacore.datasets.blended_megatron_dataset_config import (
    BlendedMegatronDatasetConfig,
)
from megacore.datasets.helpers import (
    build_blending_indices,
    build_exhaustive_blending_indices,
)
from megacore.datasets.index_cache import IndexCache, distributed_rank
from megacore.datasets.split_and_blend import normalize

__all__ = ["BlendedDataset"]

logger = logging.getLogger(__name__)


class BlendedDataset(torch.utils.data.Dataset):
    """Args:
        datasets: the datasets to mix (each with ``__len__``, ``__getitem__`` and a
            ``unique_description``).
        weights: relative weights (normalized here); ignored when ``size`` is None.
        size: number of samples; ``None`` takes every sample of every dataset once.
        config: supplies ``path_to_cache``.

    Raises:
        IndexError: the blend needs more samples from a dataset than it has.
    """

    def __init__(self, datasets: Sequence, weights: Optional[Sequence[float]],
                 size: Optional[int], config: BlendedMegatronDatasetConfig) -> None:
        if not datasets:
            raise ValueError("BlendedDataset needs at least one dataset")
        if len(datasets) > np.iinfo(np.int16).max:
            raise ValueError("BlendedDataset supports at most 32767 datasets")
        self.datasets = list(datasets)
        self.size = size
        self.config = config
        if size is None:
            self.weights = [float(len(d)) for d in self.datasets]
        else:
            self.weights = normalize(weights if weights is not None
                                     else [len(d) for d in self.datasets])
        self.split = getattr(self.datasets[0], "index_split", None)
        self.unique_description = json.dumps({
            "class": type(self).__name__,
            "datasets": [json.loads(d.unique_description) for d in self.datasets],
            "weights": self.weights,
            "size": size,
        }, indent=4)
        self._log_weights()
        self.built_anew_on_cache_miss = False
        self.dataset_index, self.dataset_sample_index = self._load_or_build()

    def _log_weights(self) -> None:
        if self.size is None:
            logger.info("blending %d datasets exhaustively (sizes %s)", len(self.datasets),
                        [int(w) for w in self.weights])
            return
        lines = [f"  {w:.6f} {getattr(d, 'dataset_path', None)}"
                 for w, d in zip(self.weights, self.datasets)]
        logger.info("blending %d datasets into %d samples, normalized weights:\n%s",
                    len(self.datasets), self.size, "\n".join(lines))

    def _cache(self) -> Optional[IndexCache]:
        if self.config.path_to_cache is None or self.config.mock:
            return None
        split_name = self.split.name if self.split is not None else "all"
        return IndexCache(self.config.path_to_cache, self.unique_description,
                          type(self).__name__, split_name)

    def _load_or_build(self):
        names = ("dataset_index", "dataset_sample_index")
        cache = self._cache()
        if cache is not None and cache.is_complete():
            arrays = cache.load(names)
            return arrays["dataset_index"], arrays["dataset_sample_index"]
        rank = distributed_rank()
        if cache is not None and rank not in (None, 0):
            raise RuntimeError(f"rank {rank}: blend cache {cache.path('description.txt')} "
                               f"is missing after rank 0 built it; path_to_cache must be "
                               f"shared by all ranks")
        dataset_index, sample_index = self._build_indices()
        self._check_not_oversampled(dataset_index)
        self.built_anew_on_cache_miss = True
        if cache is not None:
            cache.save({"dataset_index": dataset_index, "dataset_sample_index": sample_index})
        return dataset_index, sample_index

    def _build_indices(self):
        if self.size is None:
            sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
            total = int(sizes.sum())
            dataset_index = np.zeros(total, dtype=np.int16)
            sample_index = np.zeros(total, dtype=np.int64)
            build_exhaustive_blending_indices(dataset_index, sample_index, sizes,
                                              len(self.datasets))
        else:
            dataset_index = np.zeros(self.size, dtype=np.int16)
            sample_index = np.zeros(self.size, dtype=np.int64)
            build_blending_indices(dataset_index, sample_index,
                                   np.array(self.weights, dtype=np.float64),
                                   len(self.datasets), self.size, False)
        return dataset_index, sample_index

    def _check_not_oversampled(self, dataset_index: np.ndarray) -> None:
        counts = np.bincount(dataset_index, minlength=len(self.datasets))
        for d, (count, dataset) in enumerate(zip(counts, self.datasets)):
            if count > len(dataset):
                raise IndexError(
                    f"the blend takes {count} samples from dataset {d} "
                    f"({getattr(dataset, 'dataset_path', None)}), which has {len(dataset)}; "
                    f"raise mid_level_dataset_surplus (now "
                    f"{self.config.mid_level_dataset_surplus})")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> Dict:
        dataset_id = int(self.dataset_index[idx])
        sample_id = int(self.dataset_sample_index[idx])
        return {"dataset_id": dataset_id, **self.datasets[dataset_id][sample_id]}

