"""Dropout whose mask does not depend on the tensor-parallel layout.

Megatron draws dropout masks for tp-split tensors (attention probabilities, sequence-
parallel activations) from a per-tp-rank stream, so a tp=2 run and a tp=1 run drop
different elements. megacore keeps the numerical contract with dropout on instead: every
rank draws the mask of the *whole* tensor, from the default generator (identical on all
tp ranks), and keeps the slice that matches its shard.

* attention probabilities ``[b, np/tp, s, s]``: draw ``[b, np, s, s]``, keep this rank's
  heads;
* sequence-parallel activations ``[s/tp, b, h]``: draw ``[s, b, h]``, keep this rank's
  sequence chunk;
* replicated activations ``[s, b, h]``: draw and keep all of it (every tp rank draws
  the same mask, as the single process does).

The price is drawing tp times more random numbers than the shard needs (generation is
cheap next to the matmuls around it). Every rank advances the default generator by the
same amount as the single process, so later draws stay in step too, and activation
recompute replays the masks because it restores the default generator.
"""

from __future__ import annotations

import torch

__all__ = ["sharded_dropout"]


def sharded_dropout(x: torch.Tensor, p: float, training: bool, *, dim: int = 0,
                    full_size: int = -1, start: int = 0) -> torch.Tensor:
    """Dropout on ``x``, a slice ``[start, start + x.size(dim))`` of a tensor whose ``dim``
    has ``full_size`` entries; the mask is drawn for the full tensor and sliced.

    Args:
        x: this rank's shard.
        p: drop probability.
        training: no-op when False (or when ``p == 0``).
        dim: dimension along which ``x`` is a shard of the full tensor.
        full_size: size of ``dim`` in the full tensor (-1: ``x`` is the full tensor).
        start: offset of ``x`` along ``dim`` in the full tensor.

    Returns:
        ``x * mask / (1 - p)`` with the mask's matching slice.
    """
    if not training or p == 0.0:
        return x
    full_shape = list(x.shape)
    if full_size >= 0:
        full_shape[dim] = full_size
    # A bool mask: autograd saves it for backward at 1 byte per element.
    keep = torch.empty(full_shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
    if full_shape[dim] != x.size(dim) or start:
        keep = keep.narrow(dim, start, x.size(dim)).contiguous()  # copy: free the full mask
    return x * keep * (1.0 / (1.0 - p))
