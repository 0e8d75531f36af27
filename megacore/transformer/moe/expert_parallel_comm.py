"""Collectives with uneven sizes that move routed tokens, as autograd pairs.

The all-to-all token dispatcher sends each rank a different number of tokens, which the
tensor-parallel mappings (equal shards) cannot express:

===================================  ==================================  ======================
function                             forward                             backward
===================================  ==================================  ======================
all_to_all                           all-to-all, given split sizes       all-to-all, sizes
                                                                         swapped
gather_variable_along_first_dim      all-gather of unequal row counts    keep own rows (every
                                                                         rank holds the full
                                                                         grad)
split_variable_along_first_dim       keep own rows                       all-gather of unequal
                                                                         row counts
===================================  ==================================  ======================

The gather/split pair is for the expert-tensor-parallel group, whose ranks hold identical
copies of the tokens after the gather (the experts all-reduce their outputs over it), hence
"keep own rows" as the adjoint of a gather.

gloo facts (``docs/ARCHITECTURE.md``, "gloo on CPU"): all_gather with unequal sizes
fails, so rows are padded to the largest count; all_to_all_single handles zero-sized
splits (a rank that sends or receives no tokens) in both directions. Tensors are made
contiguous before every collective (gloo reads strided tensors as if contiguous).

Shapes: ``[n, h]`` rows of tokens; ``sizes[r]`` the row count of rank r.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from megacore import collectives

__all__ = ["all_to_all", "gather_variable_along_first_dim", "split_variable_along_first_dim",
           "all_gather_counts"]


def _all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                group: dist.ProcessGroup) -> torch.Tensor:
    # [sum(input_splits), h] -> [sum(output_splits), h]
    x = x.contiguous()
    out = x.new_empty((int(sum(output_splits)),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, list(output_splits), list(input_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _all_to_all(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Send ``input_splits[r]`` rows of ``x`` to rank r; receive ``output_splits[r]`` from it.

    forward: all-to-all; backward: all-to-all with the splits swapped.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def all_gather_counts(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Stack every rank's ``counts`` (same shape, integers): ``[...] -> [world, ...]``."""
    world = dist.get_world_size(group)
    if world == 1:
        return counts.unsqueeze(0)
    flat = counts.contiguous().view(-1)
    out = flat.new_empty(world * flat.numel())  # flat buffer: gloo can't gather into [W, ...]
    collectives.all_gather_single(out, flat, group=group)
    return out.view((world,) + tuple(counts.shape))


def _gather_variable(x: torch.Tensor, sizes: List[int], group: dist.ProcessGroup) -> torch.Tensor:
    # [sizes[me], h] -> pad to [max, h] -> all-gather -> [world * max, h] -> [sum(sizes), h]
    longest = max(sizes)
    if longest == 0:  # nobody has rows; skip a zero-sized collective
        return x.new_empty((0,) + tuple(x.shape[1:]))
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[:x.size(0)] = x
    out = x.new_empty((len(sizes) * longest,) + tuple(x.shape[1:]))
    collectives.all_gather_single(out, padded, group=group)
    blocks = out.view((len(sizes), longest) + tuple(x.shape[1:]))
    return torch.cat([blocks[r, :n] for r, n in enumerate(sizes)], dim=0)


def _own_rows(x: torch.Tensor, sizes: List[int], group: dist.ProcessGroup) -> torch.Tensor:
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]].contiguous()


class _GatherVariable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_variable(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_rows(grad, ctx.sizes, ctx.group), None, None


class _SplitVariable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _own_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_variable(grad.contiguous(), ctx.sizes, ctx.group), None, None


def gather_variable_along_first_dim(x: torch.Tensor, sizes: Sequence[int],
                                    group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's rows: ``[sizes[me], h] -> [sum(sizes), h]``.

    forward: all-gather (padded); backward: keep own rows (grads are replicated).
    """
    if dist.get_world_size(group) == 1:
        return x
    return _GatherVariable.apply(x, [int(n) for n in sizes], group)


def split_variable_along_first_dim(x: torch.Tensor, sizes: Sequence[int],
                                   group: dist.ProcessGroup) -> torch.Tensor:
    """Keep this rank's rows: ``[sum(sizes), h] -> [sizes[me], h]``.

    forward: keep own rows; backward: all-gather (padded).
    """
    if dist.get_world_size(group) == 1:
        return x
    return _SplitVariable.apply(x, [int(n) for n in sizes], group)
