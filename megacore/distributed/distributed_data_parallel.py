"""``DistributedDataParallel``: data parallelism over contiguous, bucketed grad buffers.

Wraps a model chunk. Every trainable param gets ``param.main_grad``, a view into a flat
buffer (:mod:`megacore.distributed.param_and_grad_buffer`); a post-accumulate-grad hook
moves each ``param.grad`` into ``main_grad`` and frees it. Grads are then averaged over
the data-parallel ranks bucket by bucket: from the hooks as soon as a bucket is complete
(``overlap_grad_reduce``), or all at once in :meth:`finish_grad_sync`.

Groups: dense params reduce over dp x cp (context-parallel ranks see different tokens of
the same sequences, so their grads are summed like dp ones); expert params
(``allreduce=False``) over the expert-data-parallel group.

Averaging: the loss on each rank is the mean over its micro-batch, so the global-batch
gradient is the mean over dp x cp ranks: grads are scaled by ``1/(dp*cp)`` before a SUM
(or reduced with AVG when ``average_in_collective``). Expert grads use the same global
divisor ``1/(dp*cp)`` even though they are summed over fewer (expert-dp) ranks: their
tokens came from all dp x cp ranks. With ``config.calculate_per_token_loss`` nothing is
scaled here; ``finalize_model_grads`` divides by the token count instead.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megacore import parallel_state
from megacore.distributed.distributed_data_parallel_config import (
    DistributedDataParallelConfig,
)
from megacore.distributed.param_and_grad_buffer import (
    ParamAndGradBucket,
    ParamAndGradBuffer,
)
from megacore.model_parallel_config import ModelParallelConfig

__all__ = ["DistributedDataParallel"]

_DEFAULT_MIN_BUCKET_SIZE = 40_000_000
_DEFAULT_BUCKET_SIZE_PER_DP_RANK = 1_000_000


def _grad_hook_of(ddp_ref, param: torch.nn.Parameter) -> None:
    ddp = ddp_ref()
    if ddp is not None:
        ddp._grad_hook(param)


class DistributedDataParallel(torch.nn.Module):
    """Data-parallel wrapper with contiguous grad buffers (Megatron-Core's DDP).

    Args:
        config: the model's parallel config (``ModelParallelConfig`` or a subclass).
        ddp_config: buffer, bucketing and overlap settings.
        module: the model chunk to wrap.
        disable_bucketing: one bucket per buffer whatever ``ddp_config.bucket_size`` says
            (used for all but the first model chunk of an interleaved pipeline).
        pg_collection: explicit process groups (default: ``parallel_state``'s).
    """

    def __init__(self, config: ModelParallelConfig, ddp_config: DistributedDataParallelConfig,
                 module: torch.nn.Module, disable_bucketing: bool = False, *,
                 pg_collection: Optional[parallel_state.ProcessGroupCollection] = None):
        super().__init__()
        self.config = config
        self.ddp_config = ddp_config
        self.module = module
        pgs = pg_collection or parallel_state.get_process_group_collection()
        self.dp_cp_group = pgs.dp_cp
        self.expert_dp_group = pgs.expt_dp
        self.bucket_size = self._resolve_bucket_size(disable_bucketing)
        dense, expert = self._trainable_params()
        dense_scale, expert_scale = self._gradient_scaling_factors()
        self.buffers = self._build_buffers(dense, self.dp_cp_group, dense_scale)
        self.expert_parallel_buffers = self._build_buffers(expert, self.expert_dp_group,
                                                           expert_scale)
        self.param_to_bucket: Dict[torch.nn.Parameter, ParamAndGradBucket] = {
            p: b for buf in self.all_buffers for p, b in buf.param_to_bucket.items()}
        self._chain_param_gather_prefetch()
        # The hooks live in C++ on each param, where Python's garbage collector cannot
        # see them: a bound method would make param -> hook -> self -> param a cycle that
        # is never freed (nor the process groups it holds, whose gloo threads would then
        # still be running at interpreter exit). A weak reference breaks it.
        hook = functools.partial(_grad_hook_of, weakref.ref(self))
        self._grad_hooks = [p.register_post_accumulate_grad_hook(hook)
                            for p in self.param_to_bucket]
        self._param_gather_hooks: List = []
        if ddp_config.overlap_param_gather:
            self.enable_forward_pre_hook()

    # -- construction -----------------------------------------------------------------
    def _resolve_bucket_size(self, disable_bucketing: bool) -> Optional[int]:
        if disable_bucketing or not self.ddp_config.overlap_grad_reduce:
            # Nothing to overlap with: one bucket per buffer means fewest collectives.
            return None
        if self.ddp_config.bucket_size is not None:
            return self.ddp_config.bucket_size
        dp = dist.get_world_size(self.dp_cp_group)
        return max(_DEFAULT_MIN_BUCKET_SIZE, _DEFAULT_BUCKET_SIZE_PER_DP_RANK * dp)

    def _trainable_params(self) -> Tuple[List[torch.nn.Parameter], List[torch.nn.Parameter]]:
        dense, expert = [], []
        for param in self.module.parameters():
            if param.requires_grad:
                (dense if getattr(param, "allreduce", True) else expert).append(param)
        return dense, expert

    def _gradient_scaling_factors(self) -> Tuple[float, float]:
        if getattr(self.config, "calculate_per_token_loss", False):
            return 1.0, 1.0
        dp_cp = dist.get_world_size(self.dp_cp_group)
        if self.ddp_config.average_in_collective:
            # AVG divides by the group size; expert groups are smaller than dp x cp.
            return 1.0, dist.get_world_size(self.expert_dp_group) / dp_cp
        return 1.0 / dp_cp, 1.0 / dp_cp

    def _build_buffers(self, params: List[torch.nn.Parameter], group: dist.ProcessGroup,
                       scaling: float) -> List[ParamAndGradBuffer]:
        by_dtype: Dict[Tuple[torch.dtype, torch.dtype], List[torch.nn.Parameter]] = \
            defaultdict(list)
        for param in params:
            grad_dtype = torch.float32 if self.ddp_config.grad_reduce_in_fp32 else param.dtype
            by_dtype[(param.dtype, grad_dtype)].append(param)
        return [ParamAndGradBuffer(self.ddp_config, param_dtype, grad_dtype, members, group,
                                   self.bucket_size, scaling)
                for (param_dtype, grad_dtype), members in by_dtype.items()]

    def _chain_param_gather_prefetch(self) -> None:
        # Buckets are laid out backward-first; forward meets them in the reverse order.
        forward_order = [b for buf in self.all_buffers for b in reversed(buf.buckets)]
        for current, following in zip(forward_order, forward_order[1:]):
            current.next_param_gather_bucket = following

    @property
    def all_buffers(self) -> List[ParamAndGradBuffer]:
        """Dense buffers followed by expert buffers."""
        return self.buffers + self.expert_parallel_buffers

    def _all_buckets(self) -> Iterator[ParamAndGradBucket]:
        for buf in self.all_buffers:
            yield from buf.buckets

    # -- hooks ------------------------------------------------------------------------
    def _grad_hook(self, param: torch.nn.Parameter) -> None:
        # A fused linear may already have added the grad into main_grad (and handed
        # autograd a dummy tensor so this hook still fires).
        if param.grad is not None and not getattr(param, "grad_added_to_main_grad", False):
            param.main_grad.add_(param.grad)
        param.grad = None
        if self.ddp_config.overlap_grad_reduce:
            self.param_to_bucket[param].register_grad_ready(param)

    def _forward_pre_hook(self, module: torch.nn.Module, *unused) -> None:
        for param in module.parameters(recurse=False):
            bucket = self.param_to_bucket.get(param)
            if bucket is not None:
                bucket.finish_param_sync(
                    skip_next_bucket_dispatch=self.ddp_config.align_param_gather)

    def enable_forward_pre_hook(self) -> None:
        """Gather params lazily, bucket by bucket, as forward reaches them."""
        if not self.ddp_config.overlap_param_gather:
            raise RuntimeError("forward pre-hooks need overlap_param_gather=True")
        if not self._param_gather_hooks:
            self._param_gather_hooks = [m.register_forward_pre_hook(self._forward_pre_hook)
                                       for m in self.module.modules()]

    def disable_forward_pre_hook(self, param_sync: bool = True) -> None:
        """Remove the pre-hooks (e.g. for evaluation); with ``param_sync`` gather now."""
        for handle in self._param_gather_hooks:
            handle.remove()
        self._param_gather_hooks = []
        if param_sync:
            self.start_param_sync(force_sync=True)

    # -- public API -------------------------------------------------------------------
    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def zero_grad_buffer(self) -> None:
        """Zero every ``main_grad`` and reset bucket state; call before each iteration."""
        for param in self.param_to_bucket:
            param.grad_added_to_main_grad = False
        for buf in self.all_buffers:
            buf.reset()

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate grads without reducing them (all but the last micro-batch)."""
        buckets = list(self._all_buckets())
        for bucket in buckets:
            bucket.is_last_microbatch = False
        try:
            yield
        finally:
            for bucket in buckets:
                bucket.is_last_microbatch = True

    def start_grad_sync(self, *unused) -> None:
        """Start every bucket's reduction now (used by pipeline schedules)."""
        for bucket in self._all_buckets():
            if not bucket.grad_sync_started:
                bucket.start_grad_sync()

    def finish_grad_sync(self) -> None:
        """Complete every bucket's reduction; afterwards ``main_grad`` holds the average
        (under the distributed optimizer: in this rank's shard of each bucket)."""
        for bucket in self._all_buckets():
            bucket.finish_grad_sync()

    def start_param_sync(self, *unused, force_sync: bool = False) -> None:
        """All-gather updated param shards (distributed optimizer); the schedules' and
        the optimizer's ``param_sync_func``."""
        for bucket in self._all_buckets():
            bucket.start_param_sync(force_sync=force_sync)

    def scale_gradients(self, scaling_factor: float) -> None:
        """Multiply all grads by ``scaling_factor`` (e.g. ``1/num_tokens``)."""
        for buf in self.all_buffers:
            buf.scale_gradients(scaling_factor)

    def broadcast_params(self) -> None:
        """Copy params from the first rank of each data-parallel group to the others."""
        for param in self.param_to_bucket:
            expert = not getattr(param, "allreduce", True)
            group = self.expert_dp_group if expert else self.dp_cp_group
            if dist.get_world_size(group) == 1:
                continue
            if not param.data.is_contiguous():
                raise RuntimeError("broadcast_params needs contiguous parameters")
            src = dist.get_global_rank(group, 0)
            dist.broadcast(param.data, src=src, group=group)

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        """The wrapped module's state dict (no ``module.`` prefix)."""
        return self.module.state_dict(destination=destination, prefix=prefix,
                                      keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)

    def sharded_state_dict(self, *args, **kwargs):
        """Pass-through to the wrapped module's ``sharded_state_dict``."""
        return self.module.sharded_state_dict(*args, **kwargs)
