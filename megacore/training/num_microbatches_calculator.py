"""Micro-batches per step: constant, growing with ``--rampup-batch-size``, or stepping
with ``--step-batch-size-schedule``.

Ramp-up (Megatron semantics): ``start increment samples`` grows the global batch from
``start`` by ``increment`` in equal sample intervals until it reaches
``--global-batch-size`` after ``samples`` consumed samples. A step schedule
``[[0, b0], [s1, b1], ...]`` (thresholds in consumed samples) uses ``b_k`` from ``s_k``
on. Each step uses the global batch of the current consumed-samples count;
micro-batches = global / (mbs x dp).
"""

from __future__ import annotations

from typing import List, Optional

__all__ = ["NumMicroBatchesCalculator"]


class NumMicroBatchesCalculator:
    """Global batch size and micro-batch count as a function of consumed samples."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int,
                 rampup_batch_size: Optional[List[int]] = None,
                 step_schedule: Optional[List[List[int]]] = None):
        self.global_batch_size = global_batch_size
        self.step_schedule = step_schedule
        self.micro_times_dp = micro_batch_size * data_parallel_size
        self.rampup = rampup_batch_size
        if rampup_batch_size is not None:
            start, increment, samples = rampup_batch_size
            steps = (global_batch_size - start) // increment
            if steps < 1 or (global_batch_size - start) % increment:
                raise ValueError(f"--rampup-batch-size {start} {increment} {samples} must reach "
                                 f"--global-batch-size {global_batch_size} in whole increments")
            self.samples_per_increment = samples / steps

    def global_batch_size_at(self, consumed_samples: int) -> int:
        if self.step_schedule is not None:
            return [b for s, b in self.step_schedule if s <= consumed_samples][-1]
        if self.rampup is None:
            return self.global_batch_size
        start, increment, _ = self.rampup
        steps = int(consumed_samples / self.samples_per_increment)
        return min(start + steps * increment, self.global_batch_size)

    def num_microbatches_at(self, consumed_samples: int) -> int:
        return self.global_batch_size_at(consumed_samples) // self.micro_times_dp
