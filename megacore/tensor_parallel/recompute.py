"""Activation recompute (checkpointing) that replays random streams exactly.

``checkpoint(fn, distribute_saved_activations, *args)`` runs ``fn`` without keeping its
intermediate activations and runs it again during backward. Dropout inside ``fn`` must
draw the same masks both times, so the checkpoint records every random stream it could
touch (the CPU generator, the accelerator generator, and the tracker's named streams) at
forward time and restores them for the recompute, then puts the streams back where the
backward pass found them. Gradients are therefore bitwise equal with and without
recompute.

``distribute_saved_activations``: the one tensor kept for recompute (``args[0]``) is
stored as this rank's ``1/tp`` slice and all-gathered before recomputing; it saves memory
when that input is replicated over tp.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from megacore import collectives, device, parallel_state
from megacore.tensor_parallel.random import get_rng_tracker
from megacore.tensor_parallel.weight_grad_phase import weight_grad_phase

__all__ = ["checkpoint", "CheckpointFunction"]


def _capture_rng():
    return device.get_rng_state(), device.get_device_rng_state(), get_rng_tracker().get_states()


def _restore_rng(states) -> None:
    host, dev, tracked = states
    device.set_rng_state(host)
    device.set_device_rng_state(dev)
    get_rng_tracker().set_states(tracked)


def _split_for_rank(x: torch.Tensor, group) -> torch.Tensor:
    flat = x.detach().contiguous().view(-1)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if flat.numel() % world:
        raise ValueError(f"cannot distribute a saved activation of {flat.numel()} elements "
                         f"over {world} tensor-parallel ranks")
    return flat.chunk(world)[rank].clone()


def _gather_from_ranks(part: torch.Tensor, shape, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty(part.numel() * world, dtype=part.dtype, device=part.device)
    collectives.all_gather_single(out, part, group=group)
    return out.view(shape)


def _distribute_group(distribute_saved_activations: bool, tp_group=None):
    """The tp group to split the saved input over, or None (not distributed): ``tp_group``
    when given, else ``parallel_state``'s; resolved once, at forward time."""
    if not distribute_saved_activations:
        return None
    if tp_group is None:
        if not parallel_state.model_parallel_is_initialized():
            return None
        tp_group = parallel_state.get_tensor_model_parallel_group()
    return tp_group if dist.get_world_size(tp_group) > 1 else None


def _forward(ctx, run_function, group, args):
    ctx.run_function = run_function
    ctx.group = group  # backward all-gathers over this very group
    ctx.rng_states = _capture_rng()
    with torch.no_grad():
        outputs = run_function(*args)
    tensors = list(args)
    if group is not None and torch.is_tensor(args[0]):
        ctx.first_shape = args[0].shape
        ctx.first_requires_grad = args[0].requires_grad
        tensors[0] = _split_for_rank(args[0], group)
    ctx.tensor_positions = [i for i, a in enumerate(tensors) if torch.is_tensor(a)]
    ctx.non_tensors = {i: a for i, a in enumerate(tensors) if not torch.is_tensor(a)}
    ctx.num_args = len(tensors)
    ctx.save_for_backward(*[tensors[i] for i in ctx.tensor_positions])
    return outputs


def _backward(ctx, grad_outputs):
    saved = dict(zip(ctx.tensor_positions, ctx.saved_tensors))
    args = [saved[i] if i in saved else ctx.non_tensors[i] for i in range(ctx.num_args)]
    if ctx.group is not None and 0 in saved:
        args[0] = _gather_from_ranks(args[0], ctx.first_shape, ctx.group)
        args[0].requires_grad_(ctx.first_requires_grad)
    inputs = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
              for a in args]
    current = _capture_rng()
    _restore_rng(ctx.rng_states)
    try:
        with torch.enable_grad():
            outputs = ctx.run_function(*inputs)
    finally:
        _restore_rng(current)
    if torch.is_tensor(outputs):
        outputs = (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
             if torch.is_tensor(o) and o.requires_grad]
    # A split backward (zero-bubble schedules) cannot defer the weight gradients of a
    # recomputed region: they come from this inner backward, which computes them all.
    with weight_grad_phase(None):
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return tuple(a.grad if torch.is_tensor(a) else None for a in inputs)


class CheckpointFunction(torch.autograd.Function):
    """Forward without saving activations; recompute them with the same RNG in backward.

    Megatron's signature: ``distribute_saved_activations`` splits the saved input over
    ``parallel_state``'s tp group. :func:`checkpoint` takes an explicit ``tp_group``.
    """

    @staticmethod
    def forward(ctx, run_function, distribute_saved_activations, *args):
        return _forward(ctx, run_function, _distribute_group(distribute_saved_activations),
                        args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return (None, None) + _backward(ctx, grad_outputs)


class _GroupCheckpointFunction(torch.autograd.Function):
    """:class:`CheckpointFunction` with the tp group (or None) given explicitly."""

    @staticmethod
    def forward(ctx, run_function, group, *args):
        return _forward(ctx, run_function, group, args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return (None, None) + _backward(ctx, grad_outputs)


def checkpoint(function: Callable, distribute_saved_activations: bool, *args: Any,
               tp_group=None):
    """Run ``function(*args)`` now and again in backward instead of storing activations.

    ``tp_group``: the tensor-parallel group ``distribute_saved_activations`` splits the
    saved input over (default: ``parallel_state``'s); a module passes its own
    ``pg_collection.tp``.
    """
    group = _distribute_group(distribute_saved_activations, tp_group)
    return _GroupCheckpointFunction.apply(function, group, *args)
