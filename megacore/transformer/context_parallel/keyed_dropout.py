"""Attention dropout masks keyed by global coordinates, for ring attention.

Ring attention computes each block of the ``[s, s]`` probability matrix on some rank at
some step, and recomputes it in backward. A mask drawn from a random stream would depend
on that order and would have to be stored (``s/cp * s`` elements per head) for backward.
Instead each element's keep/drop bit is a hash of ``(seed, batch index, global head,
query position, key position)``: any rank can produce any block's mask, in forward and
again in backward, and the mask of the whole matrix is the same for every cp (and tp)
layout.

The hash is a 32-bit integer mixer (``x ^= x >> 16; x *= 0x45d9f3b`` rounds) applied
coordinate by coordinate; all products stay below ``2**59`` so int64 never overflows.
The low 24 bits give a uniform number compared with ``p * 2**24``.

Shapes: mask ``[b, heads, sq, sk]`` (bool, True = keep).
"""

from __future__ import annotations

from typing import Optional

import torch

from megacore.tensor_parallel.random import keyed_stream

__all__ = ["attention_dropout_keep_mask", "draw_attention_dropout_seed"]

_SEED_RANGE = 2 ** 31 - 1
_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: (x < 2**32) * _MUL < 2**59, no int64 overflow
_UNIFORM_BITS = 24


def draw_attention_dropout_seed(stream: Optional[str]) -> int:
    """The key of one forward pass's attention-dropout mask, drawn from keyed RNG stream
    ``stream`` (the layer's): equal on every tp and cp rank and pipeline stage, and drawn
    again identically on recompute (the checkpoint restores the tracker)."""
    with keyed_stream(stream):
        return int(torch.randint(0, _SEED_RANGE, (1,)).item())


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash of non-negative int64 values ``< 2**32``."""
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def attention_dropout_keep_mask(seed: int, batch: int, heads: torch.Tensor,
                                q_positions: torch.Tensor, k_positions: torch.Tensor,
                                p: float) -> torch.Tensor:
    """Keep-mask of attention dropout for a block of the probability matrix.

    Args:
        seed: equal on every rank that shares the matrix (all cp and tp ranks).
        batch: number of sequences ``b`` (batch index ``i`` is hashed as is).
        heads: global head indices ``[heads]`` of the block's rows.
        q_positions: global query positions ``[sq]``.
        k_positions: global key positions ``[sk]``.
        p: drop probability.

    Returns:
        bool ``[b, heads, sq, sk]``, True where the probability is kept.
    """
    device = heads.device
    x = torch.arange(batch, device=device, dtype=torch.int64) + (seed & _M32)
    x = _mix32(x).view(batch, 1, 1, 1)
    x = _mix32(x ^ heads.to(torch.int64).view(1, -1, 1, 1))               # [b, n, 1, 1]
    x = _mix32(x ^ q_positions.to(torch.int64, copy=False).view(1, 1, -1, 1))  # [b, n, sq, 1]
    x = _mix32(x ^ k_positions.to(torch.int64, copy=False).view(1, 1, 1, -1))  # [b, n, sq, sk]
    threshold = int(round(p * (1 << _UNIFORM_BITS)))
    return (x & ((1 << _UNIFORM_BITS) - 1)) >= threshold
