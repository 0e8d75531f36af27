"""``fully_shard_model``: PyTorch FSDP2 (``fully_shard``) over megacore's data-parallel ranks.

The alternative to :class:`DistributedDataParallel` when whole parameters and gradients do
not fit one device: every parameter and its gradient are sharded (dim 0) over the
data-parallel x context-parallel ranks, all-gathered per unit just before its forward
(and again for its backward when ``reshard_after_forward``: ZeRO-3; kept gathered until
the backward otherwise: ZeRO-2), and gradients are reduce-scattered (averaged) per unit
after its backward.

Composition:

* tensor parallelism: megacore's tp shards are the "full" tensors FSDP2 sees; each tp
  rank shards its own tp shard over its dp x cp group (2-D: tp inside, FSDP outside).
* pipeline parallelism: each stage shards the layers it holds; the schedules run FSDP2
  modules like any other.
* expert parallelism: expert weights (``allreduce=False``) shard over the expert-data-
  parallel group instead, and their gradient is divided by dp x cp like DDP's (tokens
  came from all dp x cp ranks), not by the expert-dp size.

Units: ``model.fully_shard_units()`` (GPTModel: the embedding, every transformer layer,
the output layer; tied embedding and output on one stage stay in the root unit, since a
parameter cannot belong to two units), then the root for what is left (final norm).
Megacore's parameter attributes (``tensor_model_parallel``, ``sequence_parallel``,
``shared_embedding``, ``allreduce`` ...) are copied onto the new DTensor parameters, so
gradient statistics, clipping and the tp/pp gradient finalization treat them as before.

Gradient accumulation: :func:`fully_sharded_no_sync` is the schedules' ``no_sync_func``
for an FSDP2 chunk (``megacore.distributed.build_training_hooks`` installs it). Inside it
FSDP2 accumulates unsharded gradients without communicating
(``set_requires_gradient_sync(False)``), so each unit reduce-scatters once per step, on
its last micro-batch's backward, instead of once per micro-batch. Under ZeRO-2
(``reshard_after_forward=False``) the gathered parameters also stay gathered between
micro-batches (``set_reshard_after_backward(False)``, as torch's ``PipelineStage`` does for
micro-batches): the next forward needs no all-gather and the memory is held for the
backward anyway. Under ZeRO-3 they are freed after every backward, which is the point of
ZeRO-3.

Shapes: a parameter ``[n, ...]`` becomes a DTensor whose local shard is
``[ceil(n / d), ...]`` (the last ranks' shards padded or empty), ``d`` = dp x cp.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from megacore import device, parallel_state

__all__ = ["fully_shard_model", "is_fully_sharded", "local_tensor", "fully_sharded_no_sync"]

# Attributes megacore's layers put on parameters, read by optimizers, clipping,
# finalize_model_grads and checkpoints.
_PARAM_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride",
                     "sequence_parallel", "allreduce", "shared_embedding", "shared",
                     "is_embedding_or_output_parameter")


def _mesh(group: dist.ProcessGroup) -> DeviceMesh:
    return DeviceMesh.from_group(group, device_type=device.current_device().type)


def _saved_attributes(model: torch.nn.Module) -> Dict[str, Dict[str, object]]:
    return {name: {a: getattr(p, a) for a in _PARAM_ATTRIBUTES if hasattr(p, a)}
            for name, p in model.named_parameters()}


def _restore_attributes(model: torch.nn.Module, saved: Dict[str, Dict[str, object]]) -> None:
    for name, param in model.named_parameters():
        for attr, value in saved.get(name, {}).items():
            setattr(param, attr, value)


def _is_expert(param: torch.nn.Parameter) -> bool:
    return not getattr(param, "allreduce", True)


def _expert_modules(unit: torch.nn.Module) -> List[torch.nn.Module]:
    """Largest sub-modules of ``unit`` whose parameters are all expert parameters."""
    found: List[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        params = list(module.parameters())
        if params and all(_is_expert(p) for p in params) and module is not unit:
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(unit)
    return found


def fully_shard_model(model: torch.nn.Module, *, reshard_after_forward: bool = True,
                      param_dtype: Optional[torch.dtype] = None,
                      reduce_dtype: Optional[torch.dtype] = None,
                      pg_collection: Optional[parallel_state.ProcessGroupCollection] = None
                      ) -> torch.nn.Module:
    """Shard ``model`` (one pipeline chunk) in place with FSDP2 and return it.

    Args:
        model: a module with ``fully_shard_units()`` (e.g. ``GPTModel``); without it,
            only the root unit is made.
        reshard_after_forward: free the gathered parameters after each unit's forward
            and gather again for backward (ZeRO-3); False keeps them until the backward
            (ZeRO-2: more memory, one all-gather less per unit).
        param_dtype: compute dtype of the gathered parameters (e.g. ``torch.bfloat16``;
            the sharded master parameters keep their own dtype, e.g. fp32). None: as
            stored.
        reduce_dtype: dtype of the gradient reduce-scatter (e.g. ``torch.float32`` for
            fp32 reduction of bf16 gradients). None: ``param_dtype``.
        pg_collection: groups (default: ``parallel_state``'s).

    Expert parameters need the expert-data-parallel group to be a sub-grid of the world
    the same way the dense one is; both come from ``pg_collection``.
    """
    pgs = pg_collection or parallel_state.get_process_group_collection()
    dense_mesh, expert_mesh = _mesh(pgs.dp_cp), _mesh(pgs.expt_dp)
    dp_cp_size = dist.get_world_size(pgs.dp_cp)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    saved = _saved_attributes(model)
    units = list(model.fully_shard_units()) if hasattr(model, "fully_shard_units") else []
    for unit in units:
        for experts in _expert_modules(unit):
            fully_shard(experts, mesh=expert_mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=policy)
            # DDP's rule: expert grads are summed over expert-dp and divided by dp x cp.
            experts.set_gradient_divide_factor(float(dp_cp_size))
            if expert_mesh.size() > 1:
                # As SUM then a division: the scaled sum FSDP2 uses otherwise (NCCL's
                # PREMUL_SUM) does not exist on gloo. Not on a one-rank mesh, where
                # torch 2.13 then divides twice (measured: grad / factor^2).
                experts.set_force_sum_reduction_for_comms(True)
        fully_shard(unit, mesh=dense_mesh, reshard_after_forward=reshard_after_forward,
                    mp_policy=policy)
    # The root keeps what no unit took; it stays gathered after forward (its backward
    # comes first anyway).
    if any(_is_expert(p) for p in _root_params(model, units)):
        raise ValueError("expert parameters outside model.fully_shard_units() cannot be "
                         "sharded over the expert-data-parallel group")
    fully_shard(model, mesh=dense_mesh, reshard_after_forward=False, mp_policy=policy)
    _restore_attributes(model, saved)
    # Read by fully_sharded_no_sync: whether to keep parameters gathered between
    # micro-batches (ZeRO-2) or not (ZeRO-3).
    model.fsdp_reshard_after_forward = reshard_after_forward
    return model


@contextlib.contextmanager
def fully_sharded_no_sync(model: torch.nn.Module) -> Iterator[None]:
    """No gradient reduce-scatter in the block: FSDP2's ``no_sync`` for gradient
    accumulation (the schedules' ``no_sync_func`` of a :func:`fully_shard_model` chunk).

    Gradients of the micro-batches run inside accumulate unsharded, in the reduce dtype;
    the first backward outside reduce-scatters the sum. Under ZeRO-2 the parameters also
    stay gathered until then (see the module docstring).
    """
    if not isinstance(model, FSDPModule):
        raise TypeError(f"fully_sharded_no_sync needs a fully_shard_model chunk, got "
                        f"{type(model).__name__}")
    keep_gathered = not getattr(model, "fsdp_reshard_after_forward", True)
    model.set_requires_gradient_sync(False)
    if keep_gathered:
        model.set_reshard_after_backward(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
        if keep_gathered:
            model.set_reshard_after_backward(True)


def _root_params(model: torch.nn.Module, units: Sequence[torch.nn.Module]):
    taken = {id(p) for u in units for p in u.parameters()}
    return [p for p in model.parameters() if id(p) not in taken]


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or a chunk list's first element) was sharded by FSDP2."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_tensor(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """This rank's shard of a DTensor (a plain tensor as it is)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
