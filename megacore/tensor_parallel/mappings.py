"""Collectives as autograd functions: moving activations into and out of the tp region.

Each public function is one forward/backward pair. Writing the pair explicitly is what
makes a tensor-parallel layer differentiate like its single-process twin: whatever a
forward pass does across ranks, its backward does the adjoint.

=========================================  ==========================  =========================
function                                   forward                     backward
=========================================  ==========================  =========================
copy_to_tensor_model_parallel_region       identity                    all-reduce
reduce_from_tensor_model_parallel_region   all-reduce                  identity
scatter_to_tensor_model_parallel_region    split last dim              all-gather last dim
gather_from_tensor_model_parallel_region   all-gather last dim         split last dim
scatter_to_sequence_parallel_region        split first dim             all-gather first dim
gather_from_sequence_parallel_region       all-gather first dim        reduce-scatter first dim
                                                                       (or split, see below)
reduce_scatter_to_sequence_parallel_region reduce-scatter first dim    all-gather first dim
=========================================  ==========================  =========================

Shapes (sequence-first): ``[s, b, h]`` full, ``[s/tp, b, h]`` sequence-parallel,
``[s, b, h/tp]`` tensor-parallel. Every function takes an optional ``group``; the default
is the tensor-parallel group of :mod:`megacore.parallel_state`. With a group of size 1
they are all identities.

gloo reads strided tensors as if contiguous (silent corruption; ``docs/ARCHITECTURE.md``,
"gloo on CPU"), so every tensor handed to a collective here is made contiguous first.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megacore import collectives, parallel_state

__all__ = [
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "all_reduce",
    "all_gather_along_dim",
    "reduce_scatter_along_first_dim",
    "split_along_dim",
]


def _resolve(group: Optional[dist.ProcessGroup]) -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group() if group is None else group


# -- plain (non-autograd) collectives ----------------------------------------------------
def all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum ``x`` over ``group`` into a new contiguous tensor."""
    if dist.get_world_size(group) == 1:
        return x
    out = x.contiguous().clone() if x.is_contiguous() else x.contiguous()
    dist.all_reduce(out, group=group)
    return out


def split_along_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's equal slice of ``x`` along ``dim`` (contiguous copy)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.size(dim) % world:
        raise ValueError(f"dim {dim} of size {x.size(dim)} is not divisible by the "
                         f"group size {world}")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def all_gather_along_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (equal shapes required)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    x = x.transpose(0, dim).contiguous() if dim != 0 else x.contiguous()
    # [n, ...] per rank -> gather into a flat buffer -> [world * n, ...]
    out = torch.empty((world * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    collectives.all_gather_single(out, x, group=group)
    return out.transpose(0, dim).contiguous() if dim != 0 else out


def reduce_scatter_along_first_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over ``group`` and keep this rank's slice of the first dim: [s] -> [s/tp]."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.size(0) % world:
        raise ValueError(f"first dim {x.size(0)} is not divisible by the group size {world}")
    x = x.contiguous()
    out = torch.empty((x.size(0) // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    collectives.reduce_scatter_single(out, x, group=group)
    return out


# -- autograd pairs ---------------------------------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along_dim(grad, grad.dim() - 1, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_along_dim(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):
        return split_along_dim(grad, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_along_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along_dim(grad, 0, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return all_gather_along_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            return reduce_scatter_along_first_dim(grad, ctx.group), None, None
        return split_along_dim(grad, 0, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along_dim(grad, 0, ctx.group), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor,
                                         group: Optional[dist.ProcessGroup] = None):
    """Enter the tp region. forward: identity; backward: all-reduce."""
    return _CopyToRegion.apply(x, _resolve(group))


def reduce_from_tensor_model_parallel_region(x: torch.Tensor,
                                             group: Optional[dist.ProcessGroup] = None):
    """Leave the tp region by summing partial results. forward: all-reduce; backward: identity."""
    return _ReduceFromRegion.apply(x, _resolve(group))


def scatter_to_tensor_model_parallel_region(x: torch.Tensor,
                                            group: Optional[dist.ProcessGroup] = None):
    """Keep this rank's slice of the last dim: [.., h] -> [.., h/tp].

    forward: split last dim; backward: all-gather last dim.
    """
    return _ScatterToRegion.apply(x, _resolve(group))


def gather_from_tensor_model_parallel_region(x: torch.Tensor,
                                             group: Optional[dist.ProcessGroup] = None):
    """Concatenate the last dim over tp: [.., h/tp] -> [.., h].

    forward: all-gather last dim; backward: split last dim.
    """
    return _GatherFromRegion.apply(x, _resolve(group))


def scatter_to_sequence_parallel_region(x: torch.Tensor,
                                        group: Optional[dist.ProcessGroup] = None):
    """Keep this rank's slice of the sequence: [s, b, h] -> [s/tp, b, h].

    forward: split first dim; backward: all-gather first dim.
    """
    return _ScatterToSequence.apply(x, _resolve(group))


def gather_from_sequence_parallel_region(x: torch.Tensor, tensor_parallel_output_grad: bool = True,
                                         group: Optional[dist.ProcessGroup] = None):
    """Reassemble the sequence: [s/tp, b, h] -> [s, b, h].

    forward: all-gather first dim; backward: reduce-scatter first dim when the consumer
    is tensor-parallel (each rank holds a partial gradient), else split first dim
    (``tensor_parallel_output_grad=False``: every rank holds the full gradient).
    """
    return _GatherFromSequence.apply(x, _resolve(group), tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor,
                                               group: Optional[dist.ProcessGroup] = None):
    """Sum partial results and keep this rank's sequence slice: [s, b, h] -> [s/tp, b, h].

    forward: reduce-scatter first dim; backward: all-gather first dim.
    """
    return _ReduceScatterToSequence.apply(x, _resolve(group))
