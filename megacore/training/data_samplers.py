"""Which samples each data-parallel rank reads, resumable from a consumed-samples count.

A global batch is ``num_microbatches x micro_batch_size x dp`` consecutive sample indices.
For every micro-batch step the sampler takes the next ``micro_batch_size x dp`` indices and
gives rank ``r`` the slice ``[r * mbs, (r + 1) * mbs)``, as Megatron's
``MegatronPretrainingSampler`` does. So the samples of a global batch do not depend on
dp, and restarting from ``consumed_samples`` continues exactly where training stopped
(no sample repeated or skipped).

Example: mbs 2, dp 2, consumed 0 -> step 0: rank 0 gets [0, 1], rank 1 gets [2, 3];
step 1: rank 0 [4, 5], rank 1 [6, 7].
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch

__all__ = ["MegatronPretrainingSampler", "build_pretraining_data_loader", "cyclic_iter"]


class MegatronPretrainingSampler:
    """Batch sampler yielding this rank's micro-batch indices in order."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        if total_samples <= 0:
            raise ValueError(f"no samples to train on (total_samples={total_samples})")
        if consumed_samples >= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} >= total samples "
                             f"{total_samples}: the dataset is exhausted")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} is not in "
                             f"[0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def _slice(self, batch: List[int]) -> List[int]:
        start = self.data_parallel_rank * self.micro_batch_size
        return batch[start:start + self.micro_batch_size]

    def __iter__(self) -> Iterator[List[int]]:
        batch: List[int] = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.step:
                yield self._slice(batch)
                batch = []
        if batch and not self.drop_last:
            yield self._slice(batch)


def build_pretraining_data_loader(dataset, consumed_samples: int, *, micro_batch_size: int,
                                  data_parallel_rank: int, data_parallel_size: int,
                                  num_workers: int = 0,
                                  drop_last: bool = True) -> Optional[torch.utils.data.DataLoader]:
    """A DataLoader over ``dataset`` starting after ``consumed_samples`` (None if no dataset)."""
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                         data_parallel_rank, data_parallel_size, drop_last)
    # A private generator: creating a DataLoader iterator otherwise draws from the global
    # stream, which would shift dropout masks after a resume (the checkpointed RNG state
    # is restored before the iterators are built).
    generator = torch.Generator().manual_seed(data_parallel_rank)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=False, persistent_workers=num_workers > 0,
                                       generator=generator)


def cyclic_iter(iterable) -> Iterator:
    """Iterate forever (evaluation re-reads the validation set)."""
    while True:
        for item in iterable:
            yield item
