"""``build_training_hooks``: the schedules' hooks for DDP or FSDP2 model chunks.

A training loop wraps its model chunks (:class:`DistributedDataParallel` or
:func:`fully_shard_model`), builds an optimizer, and passes
``hooks=build_training_hooks(chunks, optimizer)`` to every
``get_forward_backward_func()`` call; nothing is installed on the model's config.
The chunks' own settings decide the hooks, so the hooks cannot disagree with the
wrapping:

==========================  ================================  ============================
hook                        DDP chunk                         FSDP2 chunk
==========================  ================================  ============================
``no_sync_func``            ``chunk.no_sync``                 ``fully_sharded_no_sync``:
                                                              one reduce-scatter per step
``grad_sync_func``          ``chunk.start_grad_sync`` with    (none: FSDP2 overlaps its
                            ``overlap_grad_reduce``           reduce-scatter itself)
``param_sync_func``         ``chunk.start_param_sync`` with   (none)
                            ``align_param_gather``
``finalize_model_grads``    :func:`finalize_model_grads`      the same
``grad_scale_func``         ``optimizer.scale_loss``          the same
==========================  ================================  ============================
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from megacore.distributed.distributed_data_parallel import DistributedDataParallel
from megacore.distributed.finalize_model_grads import finalize_model_grads
from megacore.distributed.fully_shard import fully_sharded_no_sync, is_fully_sharded
from megacore.pipeline_parallel import TrainingHooks

__all__ = ["build_training_hooks"]


def build_training_hooks(model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
                         optimizer: Optional[Any] = None, *,
                         timers: Optional[Callable] = None) -> TrainingHooks:
    """Hooks for a training step over ``model`` (one chunk or a list, one per virtual
    pipeline stage); see the module docstring for what each hook is.

    Args:
        model: chunks wrapped in :class:`DistributedDataParallel`, or all sharded with
            :func:`fully_shard_model`.
        optimizer: its ``scale_loss`` becomes the loss scaler (None: no scaling).
        timers: Megatron's timer factory for the schedules (None: no timing).

    Raises:
        TypeError: a chunk is neither DDP nor FSDP2, or the chunks mix the two.
    """
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    fsdp = [is_fully_sharded(chunk) for chunk in chunks]
    if all(fsdp):
        no_sync = [functools.partial(fully_sharded_no_sync, chunk) for chunk in chunks]
        grad_sync = param_sync = None
    else:
        ddp = _ddp_chunks(chunks, fsdp)
        no_sync = [chunk.no_sync for chunk in ddp]
        grad_sync = ([chunk.start_grad_sync for chunk in ddp]
                     if ddp[0].ddp_config.overlap_grad_reduce else None)
        param_sync = ([chunk.start_param_sync for chunk in ddp]
                      if ddp[0].ddp_config.align_param_gather else None)
    return TrainingHooks(
        finalize_model_grads_func=finalize_model_grads,
        grad_scale_func=optimizer.scale_loss if optimizer is not None else None,
        no_sync_func=_one_or_list(no_sync), grad_sync_func=_one_or_list(grad_sync),
        param_sync_func=_one_or_list(param_sync), timers=timers)


def _ddp_chunks(chunks: List[torch.nn.Module], fsdp: List[bool]
                ) -> List[DistributedDataParallel]:
    if any(fsdp):
        raise TypeError("build_training_hooks: the model chunks mix FSDP2 "
                        "(fully_shard_model) and other wrappers; wrap every chunk the same way")
    for chunk in chunks:
        if not isinstance(chunk, DistributedDataParallel):
            raise TypeError(f"build_training_hooks needs DistributedDataParallel or "
                            f"fully_shard_model chunks, got {type(chunk).__name__}")
    return chunks


def _one_or_list(hooks: Optional[List[Callable]]):
    """One function for a single chunk, as the schedules' per-chunk hooks accept."""
    if hooks is None:
        return None
    return hooks[0] if len(hooks) == 1 else hooks
