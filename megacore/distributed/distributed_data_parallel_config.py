"""``DistributedDataParallelConfig``: how gradients are reduced over data-parallel ranks.

Field names follow Megatron-Core's ``DistributedDataParallelConfig`` so configs port
unchanged. Only the fields megacore implements exist: an unknown Megatron field is an
error at construction rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["DistributedDataParallelConfig"]


@dataclasses.dataclass
class DistributedDataParallelConfig:
    """Gradient buffers, bucketing and the collectives of data parallelism."""

    grad_reduce_in_fp32: bool = False
    """Keep gradients (``param.main_grad``) and reduce them in float32 even when the
    params are bf16/fp16. Costs 2 extra bytes per param for bf16 models; turn on for
    mixed-precision training (Megatron's ``--accumulate-allreduce-grads-in-fp32``)."""

    overlap_grad_reduce: bool = False
    """Start each bucket's reduction from the backward pass as soon as all of its grads
    are ready (post-accumulate-grad hooks), overlapping communication with the rest of
    backward. Off: everything is reduced in ``finish_grad_sync``."""

    overlap_param_gather: bool = False
    """With the distributed optimizer, all-gather updated params lazily in forward
    pre-hooks (bucket by bucket, prefetching the next one) instead of right after the
    optimizer step. Needs ``use_distributed_optimizer``."""

    align_param_gather: bool = False
    """With ``overlap_param_gather``, let the schedule dispatch every chunk's all-gather
    through its ``param_sync_func`` hook (``build_training_hooks``), one chunk ahead of
    its forward, instead of chaining the next bucket from the pre-hook."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1): grads are reduce-scattered
    into per-rank shards and params are all-gathered after the step. Buckets are padded to
    a multiple of the data-parallel size and a param buffer is kept for the all-gather."""

    check_for_nan_in_grad: bool = True
    """Raise :class:`NonFiniteGradientError` before reducing a bucket whose local gradient
    holds NaN or Inf (names the rank), so a poisoned step never reaches the optimizer.
    On by default as in Megatron (``--no-check-for-nan-in-loss-and-grad`` turns it off);
    costs one norm per bucket per step. The training loop turns it off under fp16
    dynamic loss scaling, where overflowing grads are expected and the loss scaler skips
    those steps."""

    bucket_size: Optional[int] = None
    """Elements per bucket. None: ``max(40_000_000, 1_000_000 * dp)`` when
    ``overlap_grad_reduce`` is on, else a single bucket per buffer (fewest collectives)."""

    use_torch_fsdp2: bool = False
    """Shard params, grads and optimizer state over the data-parallel (x context-parallel)
    ranks with PyTorch FSDP2 (``megacore.distributed.fully_shard_model``) instead of DDP:
    for models whose whole weights and gradients do not fit one device. Composes with
    tp, sp, pp and ep; with ``--bf16`` the master weights stay fp32 and FSDP2 computes in
    bf16 (reducing in fp32 with ``grad_reduce_in_fp32``)."""

    fsdp_reshard_after_forward: bool = False
    """With ``use_torch_fsdp2``: free each layer's gathered weights after its forward and
    gather them again for backward (ZeRO-3, least memory). Off: keep them from forward
    to backward (ZeRO-2: one all-gather less per layer and step)."""

    average_in_collective: bool = False
    """Average with the collective's AVG op instead of pre-scaling gradients by
    ``1/dp`` and summing. Same result; pick what is faster on the backend."""

    def __post_init__(self):
        if self.fsdp_reshard_after_forward and not self.use_torch_fsdp2:
            raise ValueError("fsdp_reshard_after_forward=True needs use_torch_fsdp2=True")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("overlap_param_gather=True needs use_distributed_optimizer=True "
                             "(only the distributed optimizer all-gathers params)")
        if self.align_param_gather and not self.overlap_param_gather:
            raise ValueError("align_param_gather=True needs overlap_param_gather=True")
        if self.bucket_size is not None and (not isinstance(self.bucket_size, int)
                                             or self.bucket_size < 1):
            raise ValueError(f"bucket_size must be a positive integer or None, "
                             f"got {self.bucket_size!r}")
