"""Contiguous parameter and gradient buffers, cut into buckets, for data parallelism.

Why: reducing one large flat tensor per bucket is far cheaper than one collective per
parameter, and a flat layout is what lets the distributed optimizer give each
data-parallel rank one contiguous shard of every bucket.

Every trainable param of one (param dtype, grad dtype) kind gets a slot in a flat
``grad_data`` buffer; ``param.main_grad`` is a view of that slot (fp32 when
``grad_reduce_in_fp32``). With the distributed optimizer a matching ``param_data`` buffer
holds the params themselves (``param.data`` becomes a view into it), so the post-step
all-gather writes straight into the model.

Layout (a pure function, :func:`compute_buffer_layout`): params are placed in *reverse*
registration order, because backward produces grads roughly last-layer-first and a bucket
should fill up early. A bucket closes once it holds ``bucket_size`` elements; params are
never split across buckets. Under the distributed optimizer each bucket is padded so that
it splits into ``dp`` equal shards, each a multiple of 128 elements, and a tied
(``shared_embedding``) param gets a bucket of its own so its shards cover the same
elements on the first and the last pipeline stage.

Worked example: params a[6], b[4], c[10] (registration order), dp=2, distributed
optimizer, bucket_size=12::

    order placed     c, b, a
    bucket 0         c [0, 10), b [10, 14)  -> 14 elems, padded to 256 (2 shards x 128)
    bucket 1         a [256, 262)           -> padded to 512
    rank 0 shard     bucket 0 [0, 128): c, b;  bucket 1 [256, 384): a
    rank 1 shard     bucket 0 [128, 256): padding only;  bucket 1 [384, 512): padding

Shapes: buffers are 1-D ``[numel_padded]``; a bucket is the view ``[bucket.numel]``; a
rank's shard ``[bucket.numel / dp]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megacore import collectives
from megacore.distributed.distributed_data_parallel_config import (
    DistributedDataParallelConfig,
)

__all__ = ["BufferLayout", "compute_buffer_layout", "ParamAndGradBucket",
           "ParamAndGradBuffer", "shard_range", "NonFiniteGradientError"]


class NonFiniteGradientError(RuntimeError):
    """A local gradient holds NaN or Inf (``check_for_nan_in_grad``); names the rank."""

# Each rank's shard of a distributed-optimizer bucket is a multiple of this many elements
# (aligned, vectorizable accesses on GPU; negligible padding for real models).
SHARD_ALIGNMENT = 128


@dataclasses.dataclass(frozen=True)
class BufferLayout:
    """Where each param and bucket lives in a flat buffer.

    ``param_ranges[i]`` is ``(start, end)`` of the i-th param *as given* to
    :func:`compute_buffer_layout`; ``buckets[k]`` is ``(start, end, [param indices])``.
    ``numel`` is the padded buffer length.
    """

    param_ranges: List[Tuple[int, int]]
    buckets: List[Tuple[int, int, List[int]]]
    numel: int


def compute_buffer_layout(numels: Sequence[int], bucket_size: Optional[int],
                          data_parallel_size: int, pad_for_sharding: bool,
                          own_bucket: Sequence[bool] = ()) -> BufferLayout:
    """Place params (in the order given) into buckets of a flat buffer.

    Args:
        numels: element count of each param, in placement order.
        bucket_size: close a bucket once it holds at least this many elements
            (None: one bucket for everything).
        data_parallel_size: ranks that shard each bucket when ``pad_for_sharding``.
        pad_for_sharding: pad every bucket to a multiple of
            ``data_parallel_size * SHARD_ALIGNMENT`` (distributed optimizer).
        own_bucket: per param, True to give it a bucket of its own.
    """
    own = list(own_bucket) or [False] * len(numels)
    quantum = data_parallel_size * SHARD_ALIGNMENT if pad_for_sharding else 1
    param_ranges: List[Tuple[int, int]] = [(0, 0)] * len(numels)
    buckets: List[Tuple[int, int, List[int]]] = []
    start, cursor, members = 0, 0, []

    def close():
        nonlocal start, cursor, members
        if members:
            end = start + _round_up(cursor - start, quantum)
            buckets.append((start, end, members))
            start, cursor, members = end, end, []

    for i, n in enumerate(numels):
        if own[i]:
            close()
        param_ranges[i] = (cursor, cursor + n)
        cursor += n
        members.append(i)
        if own[i] or (bucket_size is not None and cursor - start >= bucket_size):
            close()
    close()
    return BufferLayout(param_ranges, buckets, start)


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple) if value else 0


def shard_range(bucket_numel: int, data_parallel_size: int, rank: int) -> Tuple[int, int]:
    """``(start, end)`` of ``rank``'s shard inside a bucket (bucket-local coordinates)."""
    size = bucket_numel // data_parallel_size
    return rank * size, (rank + 1) * size


def _require_contiguous(tensor: torch.Tensor, what: str) -> None:
    # gloo reads strided views as if contiguous and silently corrupts (docs/ARCHITECTURE.md).
    if not tensor.is_contiguous():
        raise RuntimeError(f"{what} must be contiguous for a collective")


class ParamAndGradBucket:
    """One bucket: a contiguous slice of a buffer reduced (and gathered) as one tensor.

    Tracks which params have their grad ready (``overlap_grad_reduce``) and the handles of
    in-flight collectives.
    """

    def __init__(self, params: List[torch.nn.Parameter], grad_data: torch.Tensor,
                 param_data: Optional[torch.Tensor], offset: int, index: int,
                 ddp_config: DistributedDataParallelConfig,
                 data_parallel_group: dist.ProcessGroup, gradient_scaling_factor: float):
        self.params = params
        self.params_set = set(params)
        self.grad_data = grad_data  # [numel] view of the buffer's grad_data
        self.param_data = param_data  # [numel] view of param_data, or None
        self.offset = offset
        self.numel = grad_data.numel()
        self.index = index
        self.ddp_config = ddp_config
        self.data_parallel_group = data_parallel_group
        self.data_parallel_size = dist.get_world_size(data_parallel_group)
        self.data_parallel_rank = dist.get_rank(data_parallel_group)
        self.gradient_scaling_factor = gradient_scaling_factor
        self.next_param_gather_bucket: Optional["ParamAndGradBucket"] = None
        self.grad_reduce_handle = None
        self.param_gather_handle = None
        self.param_gather_dispatched = False
        self.reset()

    def reset(self) -> None:
        """Forget which grads arrived (call at the start of every iteration)."""
        self.params_with_grad = set()
        self.is_last_microbatch = True
        # Whether this iteration's reduction was started. Kept apart from the handle:
        # a one-rank group starts (scales) a reduction but has no collective to wait on.
        self.grad_sync_started = False

    def local_shard(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a bucket-sized view (``[numel] -> [numel / dp]``)."""
        start, end = shard_range(self.numel, self.data_parallel_size, self.data_parallel_rank)
        return data[start:end]

    # -- gradient reduction -----------------------------------------------------------
    def register_grad_ready(self, param: torch.nn.Parameter) -> None:
        """Called from the backward hook: start the reduction once every grad is in."""
        if not self.is_last_microbatch:
            return  # inside no_sync(): keep accumulating
        if param in self.params_with_grad:
            raise RuntimeError("a parameter's gradient hook fired twice in one backward")
        self.params_with_grad.add(param)
        if len(self.params_with_grad) == len(self.params):
            self.start_grad_sync()

    def start_grad_sync(self) -> None:
        """Reduce this bucket's grads over dp (all-reduce, or reduce-scatter to shards).

        A one-rank group has nothing to reduce: the grads are only scaled, but the bucket
        still records that its reduction started, so ``finish_grad_sync`` can tell a
        finished bucket from one whose grads never arrived.
        """
        if self.grad_sync_started:
            raise RuntimeError(f"bucket {self.index}: gradient reduction already started "
                               "in this iteration")
        self.grad_sync_started = True
        if self.ddp_config.check_for_nan_in_grad:
            norm = self.grad_data.float().norm()
            if not torch.isfinite(norm):
                raise NonFiniteGradientError(
                    f"rank {dist.get_rank()}: NaN or Inf in local gradients of bucket "
                    f"{self.index} before the data-parallel reduction")
        if self.gradient_scaling_factor != 1.0:
            self.grad_data.mul_(self.gradient_scaling_factor)
        if self.data_parallel_size == 1:
            return
        op = dist.ReduceOp.AVG if self.ddp_config.average_in_collective else dist.ReduceOp.SUM
        async_op = self.ddp_config.overlap_grad_reduce
        _require_contiguous(self.grad_data, "bucket grad_data")
        if self.ddp_config.use_distributed_optimizer:
            # [numel] -> reduce-scatter -> [numel / dp], written in place into our shard.
            self.grad_reduce_handle = collectives.reduce_scatter_single(
                self.local_shard(self.grad_data), self.grad_data, op=op,
                group=self.data_parallel_group, async_op=async_op)
        else:
            self.grad_reduce_handle = dist.all_reduce(
                self.grad_data, op=op, group=self.data_parallel_group, async_op=async_op)

    def finish_grad_sync(self) -> None:
        """Wait for the reduction (or run it now when not overlapping with backward)."""
        self.param_gather_dispatched = False
        if not self.ddp_config.overlap_grad_reduce:
            self.start_grad_sync()
            self.grad_sync_started = False
            return
        if not self.grad_sync_started:
            raise RuntimeError(
                f"bucket {self.index}: the gradient reduction was never started: "
                f"{len(self.params_with_grad)}/{len(self.params)} params received a gradient "
                "in backward. With overlap_grad_reduce every trainable parameter must get a "
                "gradient on the last micro-batch (unused parameters? call inside no_sync?)")
        if self.grad_reduce_handle is not None:  # None: one-rank group, nothing in flight
            self.grad_reduce_handle.wait()
            self.grad_reduce_handle = None
        self.grad_sync_started = False

    # -- parameter all-gather (distributed optimizer) --------------------------------
    def start_param_sync(self, force_sync: bool = False) -> None:
        """All-gather every rank's updated shard into ``param_data``.

        Asynchronous under ``overlap_param_gather`` unless ``force_sync``; a forced sync
        that finds a gather in flight just waits for it.
        """
        if self.param_data is None:
            raise RuntimeError("param all-gather needs use_distributed_optimizer=True")
        if self.param_gather_handle is not None:
            if not force_sync:
                raise RuntimeError(f"bucket {self.index}: param all-gather already in flight")
            self.param_gather_handle.wait()
            self.param_gather_handle = None
            return
        self.param_gather_dispatched = True
        if self.data_parallel_size == 1:
            return
        async_op = self.ddp_config.overlap_param_gather and not force_sync
        _require_contiguous(self.param_data, "bucket param_data")
        # [numel / dp] (our shard) -> all-gather -> [numel], in place.
        self.param_gather_handle = collectives.all_gather_single(
            self.param_data, self.local_shard(self.param_data),
            group=self.data_parallel_group, async_op=async_op)

    def finish_param_sync(self, skip_next_bucket_dispatch: bool = False) -> None:
        """Make this bucket's params current (forward pre-hook); prefetch the next bucket."""
        if not self.param_gather_dispatched:
            self.start_param_sync()
        if self.param_gather_handle is None:
            return
        self.param_gather_handle.wait()
        self.param_gather_handle = None
        following = self.next_param_gather_bucket
        if following is not None and not skip_next_bucket_dispatch \
                and not following.param_gather_dispatched:
            following.start_param_sync()


class ParamAndGradBuffer:
    """Flat grad (and, for the distributed optimizer, param) storage for a set of params.

    Args:
        ddp_config: bucketing and reduction settings.
        param_dtype: dtype of every param given.
        grad_dtype: dtype of ``grad_data`` / ``param.main_grad``.
        params: params in registration order (placed in reverse).
        data_parallel_group: ranks that reduce these grads (dp x cp, or expert dp).
        bucket_size: see :func:`compute_buffer_layout`.
        gradient_scaling_factor: grads are multiplied by this before the reduction
            (``1/dp`` for averaging with SUM).
    """

    def __init__(self, ddp_config: DistributedDataParallelConfig, param_dtype: torch.dtype,
                 grad_dtype: torch.dtype, params: List[torch.nn.Parameter],
                 data_parallel_group: dist.ProcessGroup, bucket_size: Optional[int],
                 gradient_scaling_factor: float):
        self.ddp_config = ddp_config
        self.param_dtype, self.grad_dtype = param_dtype, grad_dtype
        self.data_parallel_group = data_parallel_group
        self.data_parallel_size = dist.get_world_size(data_parallel_group)
        self.gradient_scaling_factor = gradient_scaling_factor
        placed = list(reversed(params))
        sharded = ddp_config.use_distributed_optimizer
        layout = compute_buffer_layout(
            [p.numel() for p in placed], bucket_size, self.data_parallel_size, sharded,
            [sharded and bool(getattr(p, "shared_embedding", False)) for p in placed])
        self.numel = layout.numel
        device = placed[0].device
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data = (torch.zeros(self.numel, dtype=param_dtype, device=device)
                           if sharded else None)
        self.params = placed
        self.param_index_map: Dict[torch.nn.Parameter, Tuple[int, int]] = {}
        for param, (start, end) in zip(placed, layout.param_ranges):
            self._attach(param, start, end)
        self.buckets = [self._make_bucket(k, start, end, [placed[i] for i in members])
                        for k, (start, end, members) in enumerate(layout.buckets)]
        self.param_to_bucket = {p: b for b in self.buckets for p in b.params}

    def _attach(self, param: torch.nn.Parameter, start: int, end: int) -> None:
        self.param_index_map[param] = (start, end)
        if self.param_data is not None:
            view = self.param_data[start:end].view(param.shape)
            view.copy_(param.data)
            param.data = view
        param.main_grad = self.grad_data[start:end].view(param.shape)

    def _make_bucket(self, index: int, start: int, end: int,
                     params: List[torch.nn.Parameter]) -> ParamAndGradBucket:
        param_view = self.param_data[start:end] if self.param_data is not None else None
        return ParamAndGradBucket(params, self.grad_data[start:end], param_view, start, index,
                                  self.ddp_config, self.data_parallel_group,
                                  self.gradient_scaling_factor)

    def scale_gradients(self, factor: float) -> None:
        """Multiply every gradient in the buffer by ``factor``."""
        self.grad_data.mul_(factor)

    def reset(self) -> None:
        """Zero the gradients and forget which arrived."""
        self.grad_data.zero_()
        for bucket in self.buckets:
            bucket.reset()
