"""``DistributedOptimizer``: ZeRO-1, fp32 main params and optimizer state sharded over dp.

Each DDP bucket is cut into ``dp`` equal shards (``param_and_grad_buffer.shard_range``);
this rank owns shard ``dp_rank`` of every bucket, and with it the pieces of the params
that overlap the shard. It keeps fp32 main params and Adam moments for those pieces only,
so per param a rank holds ``params (2 B bf16) + grads (4 B fp32) + 12/dp B`` instead of
18 B. One step:

    backward        grads reduce-scattered: each rank gets the dp-sum of its shard
    step            main grad shard = fp32 view of the grad buffer's shard
                    unscale, global norm (all ranks), clip, torch step on the shards
    param sync      copy main shard -> model param buffer shard, all-gather each bucket
                    (now, or lazily in forward pre-hooks with ``overlap_param_gather``)

Worked example: bucket of 512 elements holding a[0, 300) and b[300, 400) (then padding),
dp=2, so rank 0 owns [0, 256) and rank 1 [256, 512)::

    rank 0: a[0:256)                 -> main param shard of 256 fp32 elements
    rank 1: a[256:300), b[0:100)     -> two main param shards of 44 and 100 elements

Shapes: a param piece is 1-D ``[hi - lo]`` (a slice of the flattened param); a bucket
shard ``[bucket.numel / dp]``; gathered state ``[fields, bucket.numel]``.

State dict: the format of ``MegatronOptimizer.state_dict`` (full tensors per param). To
build it every rank all-gathers each bucket's main params and moments over dp, then cuts
them per param; loading cuts this rank's pieces back out. So a state saved at dp=4 loads
at dp=2 (or into a non-distributed optimizer, and vice versa).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megacore import collectives, device
from megacore.distributed.param_and_grad_buffer import (
    ParamAndGradBucket,
    ParamAndGradBuffer,
    shard_range,
)
from megacore.optimizer.clip_grads import GradStatsContext
from megacore.optimizer.grad_scaler import MegatronGradScaler
from megacore.optimizer.optimizer import (
    MegatronOptimizer,
    OptimizerFactory,
    _check_keys,
)
from megacore.optimizer.optimizer_config import OptimizerConfig

__all__ = ["DistributedOptimizer"]


@dataclasses.dataclass
class _Piece:
    """The part of one model param inside this rank's shard of its bucket."""

    model_param: torch.nn.Parameter
    main_param: torch.Tensor  # [hi - lo] fp32; a view of model_shard for fp32 params
    model_shard: torch.Tensor  # [hi - lo] view into the param buffer
    grad_shard: torch.Tensor  # [hi - lo] view into the grad buffer
    param_range: Tuple[int, int]  # (lo, hi) in the flattened param
    shard_range: Tuple[int, int]  # the same elements in the bucket shard's coordinates


def _pieces_of_bucket(buffer: ParamAndGradBuffer, bucket: ParamAndGradBucket) -> List[_Piece]:
    start, end = shard_range(bucket.numel, bucket.data_parallel_size, bucket.data_parallel_rank)
    start, end = start + bucket.offset, end + bucket.offset  # in buffer coordinates
    pieces = []
    for param in bucket.params:
        p_start, p_end = buffer.param_index_map[param]
        lo, hi = max(p_start, start), min(p_end, end)
        if lo >= hi:
            continue
        model_shard = param.detach().view(-1)[lo - p_start:hi - p_start]
        main = model_shard if param.dtype == torch.float32 else model_shard.clone().float()
        pieces.append(_Piece(param, main, model_shard,
                             param.main_grad.view(-1)[lo - p_start:hi - p_start],
                             (lo - p_start, hi - p_start), (lo - start, hi - start)))
    return pieces


class DistributedOptimizer(MegatronOptimizer):
    """Mixed-precision optimizer whose main params and state are sharded over dp.

    Args:
        param_groups: torch param groups over model params (all in ``buffers``).
        optimizer_factory: builds the torch optimizer from param groups.
        config: optimizer settings.
        grad_scaler: loss scaler (fp16), or None.
        stats: gradient-statistics weighting (replicas = 1: shards are disjoint).
        names: state-dict key of every model param.
        buffers: the DDP buffers holding these params (all with one dp group).
    """

    def __init__(self, param_groups: List[dict], optimizer_factory: OptimizerFactory,
                 config: OptimizerConfig, grad_scaler: Optional[MegatronGradScaler],
                 stats: GradStatsContext, names: Dict[torch.nn.Parameter, str],
                 buffers: List[ParamAndGradBuffer]):
        self.buffers = buffers
        groups = {id(b.data_parallel_group): b.data_parallel_group for b in buffers}
        if len(groups) > 1:
            raise ValueError("one DistributedOptimizer shards over one data-parallel group; "
                             "use a ChainedOptimizer for dense and expert params")
        self.data_parallel_group = next(iter(groups.values())) if groups else None
        self._bucket_pieces = [(buf, bucket, _pieces_of_bucket(buf, bucket))
                               for buf in buffers for bucket in buf.buckets]
        by_param = {pc.model_param: pc for _, _, pcs in self._bucket_pieces for pc in pcs}
        in_buffers = {p for buf in buffers for p in buf.param_index_map}
        main_groups = []
        for group in param_groups:
            outside = [p for p in group["params"] if p not in in_buffers]
            if outside:
                raise ValueError(f"{len(outside)} params are not in a DDP buffer: wrap every "
                                 "model chunk in DistributedDataParallel with "
                                 "use_distributed_optimizer=True")
            main_groups.append({**group, "params": [by_param[p].main_param
                                                    for p in group["params"] if p in by_param]})
        super().__init__(optimizer_factory(main_groups), config, grad_scaler, stats, names)
        self._pieces = [by_param[p] for g in param_groups for p in g["params"] if p in by_param]
        self._entries = [(pc.model_param, pc.main_param) for pc in self._pieces]
        self._all_params = [p for g in param_groups for p in g["params"]]

    # -- grads and params --------------------------------------------------------------
    def _copy_model_grads_to_main_grads(self) -> None:
        for pc in self._pieces:
            grad = pc.grad_shard
            pc.main_param.grad = grad if grad.dtype == torch.float32 else grad.float()

    def _copy_main_params_to_model_params(self) -> None:
        for pc in self._pieces:
            if pc.main_param is not pc.model_shard:
                pc.model_shard.copy_(pc.main_param)

    def reload_model_params(self) -> None:
        for pc in self._pieces:
            if pc.main_param is not pc.model_shard:
                pc.main_param.copy_(pc.model_shard)

    def _sync_params(self, force_sync: bool) -> None:
        for _, bucket, _ in self._bucket_pieces:
            if force_sync or not self.buffers[0].ddp_config.overlap_param_gather:
                bucket.start_param_sync(force_sync=True)
            else:
                bucket.param_gather_dispatched = False  # forward pre-hooks gather it

    def step_with_ready_grads(self) -> bool:
        """Torch step on the shards, copy into the param buffer, all-gather (or arm the
        forward pre-hooks)."""
        self.optimizer.step()
        self._copy_main_params_to_model_params()
        self._sync_params(force_sync=False)
        return True

    # -- state dict --------------------------------------------------------------------
    def _state_fields(self) -> Tuple[List[str], Dict[str, torch.Tensor]]:
        """Names of per-element state fields, and the scalar fields' values (e.g. Adam's
        ``step``), agreed over dp: a rank may own no piece of some params."""
        if self.data_parallel_group is None:
            return [], {}
        tensors, scalars = set(), {}
        for pc in self._pieces:
            for key, value in self.optimizer.state.get(pc.main_param, {}).items():
                if torch.is_tensor(value) and value.dim():
                    tensors.add(key)
                elif torch.is_tensor(value):
                    scalars[key] = max(scalars.get(key, float("-inf")), float(value))
        gathered = [None] * dist.get_world_size(self.data_parallel_group)
        dist.all_gather_object(gathered, (sorted(tensors), scalars),
                               group=self.data_parallel_group)
        fields = sorted({k for names, _ in gathered for k in names})
        merged: Dict[str, float] = {}
        for _, values in gathered:
            for key, value in values.items():
                merged[key] = max(merged.get(key, float("-inf")), value)
        return fields, {k: torch.tensor(v, dtype=torch.float32) for k, v in merged.items()}

    def _gather_bucket(self, bucket: ParamAndGradBucket, pieces: List[_Piece],
                       fields: List[str]) -> torch.Tensor:
        """``[1 + len(fields), bucket.numel]``: main params and state over the bucket."""
        dp, rows = bucket.data_parallel_size, 1 + len(fields)
        shard = bucket.numel // dp
        local = torch.zeros(rows, shard, dtype=torch.float32, device=device.current_device())
        for pc in pieces:
            lo, hi = pc.shard_range
            local[0, lo:hi] = pc.main_param.detach()
            state = self.optimizer.state.get(pc.main_param, {})
            for row, key in enumerate(fields, start=1):
                if key in state:
                    local[row, lo:hi] = state[key].reshape(-1)
        if dp == 1:
            return local
        out = torch.empty(dp * rows * shard, dtype=torch.float32, device=local.device)
        # [rows * shard] per rank -> all-gather -> [dp, rows, shard] -> [rows, dp * shard]
        collectives.all_gather_single(out, local.view(-1), group=bucket.data_parallel_group)
        return out.view(dp, rows, shard).transpose(0, 1).reshape(rows, bucket.numel)

    def _param_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        fields, scalars = self._state_fields()
        names = ["main_param"] + fields
        out = {}
        for buf, bucket, pieces in self._bucket_pieces:
            full = self._gather_bucket(bucket, pieces, fields)
            for param in bucket.params:
                start, end = (i - bucket.offset for i in buf.param_index_map[param])
                entry = {name: full[row, start:end].view(param.shape).clone()
                         for row, name in enumerate(names)}
                entry.update({k: v.clone() for k, v in scalars.items()})
                out[self.names[param]] = entry
        return out

    def _load_param_state(self, params: Dict[str, Dict[str, torch.Tensor]]) -> None:
        _check_keys(params, [self.names[p] for p in self._all_params])
        for pc in self._pieces:
            saved = params[self.names[pc.model_param]]
            lo, hi = pc.param_range
            pc.main_param.data.copy_(saved["main_param"].reshape(-1)[lo:hi])
            self.optimizer.state[pc.main_param] = {
                key: (value.reshape(-1)[lo:hi].clone().to(torch.float32) if value.dim()
                      else value.clone())
                for key, value in saved.items() if key != "main_param"}
        self._copy_main_params_to_model_params()
        self._sync_params(force_sync=True)
