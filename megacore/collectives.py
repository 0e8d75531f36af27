"""Flat-buffer collectives under the names of the installed PyTorch.

PyTorch 2.13 renamed ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to
``all_gather_single`` / ``reduce_scatter_single`` (same signature) and warns on the old
names; older releases only have the old ones. megacore calls these two through this
module so that it works, without warnings, on every supported PyTorch.

Both need contiguous tensors; on gloo a strided tensor is silently read as if it were
contiguous (``docs/ARCHITECTURE.md``, "gloo on CPU"), so the inputs are checked here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_single", "reduce_scatter_single"]

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("collectives need contiguous tensors (gloo would read a strided "
                             "tensor as if it were contiguous)")


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group=None,
                      async_op: bool = False):
    """Gather every rank's ``input`` into the flat ``output`` (rank-major)."""
    _check(output, input)
    return _ALL_GATHER(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, op=dist.ReduceOp.SUM,
                          group=None, async_op: bool = False):
    """Sum ``input`` over ranks and keep this rank's equal slice in ``output``."""
    _check(output, input)
    return _REDUCE_SCATTER(output, input, op=op, group=group, async_op=async_op)
