"""Dropout on activations whose mask does not depend on the parallel layout.

Megatron draws dropout masks for tp-split tensors (attention probabilities, sequence-
parallel activations) from a per-tp-rank stream, so a tp=2 run and a tp=1 run drop
different elements. megacore keeps the numerical contract with dropout on instead: every
rank draws the mask of the *whole* tensor, from a stream that is identical on all tp ranks
(see ``stream`` below), and keeps the slice that matches its shard.

* attention probabilities: not here; they use the keyed hash mask of
  :mod:`megacore.transformer.context_parallel.keyed_dropout` (the same mask whether
  attention runs as a ring over cp ranks or in one piece);
* sequence-parallel activations ``[s/tp, b, h]``: draw ``[s, b, h]``, keep this rank's
  sequence chunk;
* replicated activations ``[s, b, h]``: draw and keep all of it (every tp rank draws
  the same mask, as the single process does);
* context-parallel activations ``[s/cp, b, h]`` (two sequence chunks per rank, see
  :mod:`megacore.transformer.context_parallel.sequence_split`): draw ``[s, b, h]`` and keep
  the rows of this rank's global token positions (then its sequence-parallel slice).

The price is drawing tp times more random numbers than the shard needs (generation is
cheap next to the matmuls around it).

Each call names its ``stream`` (one per embedding and per transformer layer): the mask is
drawn from that keyed stream of the RNG tracker, so a layer draws the same masks on
whichever pipeline stage it runs and in whatever order the schedule interleaves it with
other layers; activation recompute replays them because it restores the tracker. Without
a seeded tracker (or without a stream name) masks come from the default generator.
"""

from __future__ import annotations

from typing import Optional

import torch

from megacore.tensor_parallel.random import keyed_stream
from megacore.transformer.context_parallel.sequence_split import (
    get_position_ids_on_cp_rank,
)

__all__ = ["sharded_dropout", "sequence_dropout"]


def sharded_dropout(x: torch.Tensor, p: float, training: bool, *, dim: int = 0,
                    full_size: int = -1, start: int = 0,
                    stream: Optional[str] = None) -> torch.Tensor:
    """Dropout on ``x``, a slice ``[start, start + x.size(dim))`` of a tensor whose ``dim``
    has ``full_size`` entries; the mask is drawn for the full tensor and sliced.

    Args:
        x: this rank's shard.
        p: drop probability.
        training: no-op when False (or when ``p == 0``).
        dim: dimension along which ``x`` is a shard of the full tensor.
        full_size: size of ``dim`` in the full tensor (-1: ``x`` is the full tensor).
        start: offset of ``x`` along ``dim`` in the full tensor.
        stream: keyed RNG stream to draw the mask from (see the module docstring).

    Returns:
        ``x * mask / (1 - p)`` with the mask's matching slice.
    """
    if not training or p == 0.0:
        return x
    full_shape = list(x.shape)
    if full_size >= 0:
        full_shape[dim] = full_size
    # A bool mask: autograd saves it for backward at 1 byte per element.
    with keyed_stream(stream):
        keep = torch.empty(full_shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
    if full_shape[dim] != x.size(dim) or start:
        keep = keep.narrow(dim, start, x.size(dim)).contiguous()  # copy: free the full mask
    return x * keep * (1.0 / (1.0 - p))


def sequence_dropout(x: torch.Tensor, p: float, training: bool, *, tp_size: int = 1,
                     tp_rank: int = 0, sequence_parallel: bool = False, cp_size: int = 1,
                     cp_rank: int = 0, stream: Optional[str] = None) -> torch.Tensor:
    """Dropout on activations ``[s_local, b, h]`` with the single-process mask.

    ``s_local`` is ``s / cp`` (``/ tp`` more under sequence parallelism). The mask of the
    full ``[s, b, h]`` is drawn and this rank's rows picked by their global positions, so
    any tp/sp/cp layout drops exactly the elements the single process drops.

    Example: s=8, cp=2, cp rank 0 holds positions [0, 1, 6, 7]; with sequence parallelism
    over tp=2, tp rank 1 of it holds [6, 7].
    """
    if not training or p == 0.0:
        return x
    sp = sequence_parallel and tp_size > 1
    if cp_size == 1:
        if not sp:
            return sharded_dropout(x, p, training, stream=stream)
        return sharded_dropout(x, p, training, dim=0, full_size=x.size(0) * tp_size,
                               start=tp_rank * x.size(0), stream=stream)
    per_cp_rank = x.size(0) * (tp_size if sp else 1)
    full = per_cp_rank * cp_size
    rows = get_position_ids_on_cp_rank(full, cp_size, cp_rank, device=x.device)
    if sp:
        rows = rows[tp_rank * x.size(0):(tp_rank + 1) * x.size(0)]
    with keyed_stream(stream):
        keep = torch.empty([full] + list(x.shape[1:]), dtype=torch.bool,
                           device=x.device).bernoulli_(1.0 - p)
    return x * keep.index_select(0, rows) * (1.0 / (1.0 - p))
