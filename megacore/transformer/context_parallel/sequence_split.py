"""Load-balanced ("zigzag") split of the sequence over context-parallel ranks.

With a causal mask, token ``t`` attends to ``t + 1`` keys, so cutting the sequence into
``cp`` contiguous pieces gives the last rank ``2 * cp - 1`` times the attention work of
the first. Instead the sequence is cut into ``2 * cp`` equal chunks and cp rank ``i``
holds chunks ``i`` and ``2 * cp - 1 - i``: every rank gets one early and one late chunk,
and the same amount of causal work (Megatron's ``get_batch_on_this_cp_rank``).

Worked example: ``s = 16``, ``cp = 2`` (chunks of 4 tokens)::

    chunk      0        1        2         3
    tokens   0..3     4..7     8..11    12..15
    rank 0 holds chunks 0, 3 -> global positions [0 1 2 3 12 13 14 15]
    rank 1 holds chunks 1, 2 -> global positions [4 5 6 7  8  9 10 11]

Local positions are increasing, so a plain causal mask on the local query/key pair of a
rank is the correct mask for its own tokens (used by ring attention's first step).

Shapes: batch tensors are batch-first ``[b, s]`` (``attention_mask`` ``[b, 1, s, s]``);
activations are sequence-first ``[s, b, h]``; a rank holds ``s/cp`` tokens.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megacore import collectives

__all__ = [
    "cp_chunk_ids",
    "get_position_ids_on_cp_rank",
    "split_for_cp_rank",
    "merge_cp_shards",
    "get_batch_on_this_cp_rank",
    "merge_batch_from_cp_ranks",
    "gather_from_context_parallel_ranks",
]

# Batch keys and their sequence dim. ``attention_mask`` [b, 1, sq, sk] is split along its
# query dim only: a rank's queries still see the keys of the whole sequence.
_BATCH_SEQ_DIMS = {"tokens": 1, "labels": 1, "loss_mask": 1, "position_ids": 1,
                   "attention_mask": 2}


def cp_chunk_ids(cp_size: int, cp_rank: int) -> tuple:
    """The two chunk indices (of ``2 * cp_size``) held by ``cp_rank``: ``(i, 2cp-1-i)``."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _check_divisible(seq_len: int, cp_size: int) -> int:
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} must be divisible by 2 * "
                         f"context_parallel_size = {2 * cp_size}")
    return seq_len // (2 * cp_size)


def get_position_ids_on_cp_rank(seq_len: int, cp_size: int, cp_rank: int,
                                device: Optional[torch.device] = None) -> torch.Tensor:
    """Global positions of the ``seq_len / cp_size`` tokens this rank holds, in local order.

    Use them for position embeddings and rotary angles, which must follow the global
    token index, not the local one. Example: ``(16, 2, 0)`` -> ``[0..3, 12..15]``.
    """
    chunk = _check_divisible(seq_len, cp_size)
    first, second = cp_chunk_ids(cp_size, cp_rank)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk, device=device),
                      torch.arange(second * chunk, (second + 1) * chunk, device=device)])


def split_for_cp_rank(tensor: torch.Tensor, seq_dim: int, cp_size: int,
                      cp_rank: int) -> torch.Tensor:
    """This rank's two chunks of ``tensor`` along ``seq_dim`` (a contiguous copy).

    ``[.., s, ..] -> [.., 2cp, s/(2cp), ..] -> pick chunks (i, 2cp-1-i) -> [.., s/cp, ..]``
    """
    if cp_size == 1:
        return tensor
    seq_dim = seq_dim % tensor.dim()
    chunk = _check_divisible(tensor.size(seq_dim), cp_size)
    shape = list(tensor.shape)
    chunked = tensor.view(*shape[:seq_dim], 2 * cp_size, chunk, *shape[seq_dim + 1:])
    index = torch.tensor(cp_chunk_ids(cp_size, cp_rank), device=tensor.device)
    local = chunked.index_select(seq_dim, index)  # [.., 2, s/(2cp), ..]
    shape[seq_dim] = 2 * chunk
    return local.reshape(shape).contiguous()


def merge_cp_shards(shards: Sequence[torch.Tensor], seq_dim: int) -> torch.Tensor:
    """Inverse of :func:`split_for_cp_rank`: the full tensor from the shards of all ranks.

    ``shards[r]`` is rank ``r``'s ``[.., s/cp, ..]``; returns ``[.., s, ..]`` in global order.
    """
    cp_size = len(shards)
    if cp_size == 1:
        return shards[0]
    seq_dim = seq_dim % shards[0].dim()
    pieces: List[Optional[torch.Tensor]] = [None] * (2 * cp_size)
    for rank, shard in enumerate(shards):
        first, second = shard.chunk(2, dim=seq_dim)
        i, j = cp_chunk_ids(cp_size, rank)
        pieces[i], pieces[j] = first, second
    return torch.cat(pieces, dim=seq_dim)


def get_batch_on_this_cp_rank(batch: Dict[str, Optional[torch.Tensor]], cp_size: int,
                              cp_rank: int) -> Dict[str, Optional[torch.Tensor]]:
    """Slice a batch dict to this cp rank's tokens.

    ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` ``[b, s] -> [b, s/cp]``;
    ``attention_mask`` ``[b, 1, s, s] -> [b, 1, s/cp, s]`` (queries only). Other keys and
    None values pass through unchanged. When the batch has no ``position_ids``, they are
    added (global positions, ``[b, s/cp]``), because the model cannot infer them from the
    local tokens.
    """
    if cp_size == 1:
        return dict(batch)
    out: Dict[str, Optional[torch.Tensor]] = {}
    for key, value in batch.items():
        if value is not None and key in _BATCH_SEQ_DIMS:
            value = split_for_cp_rank(value, _BATCH_SEQ_DIMS[key], cp_size, cp_rank)
        out[key] = value
    if out.get("position_ids") is None and batch.get("tokens") is not None:
        tokens = batch["tokens"]
        positions = get_position_ids_on_cp_rank(tokens.size(1), cp_size, cp_rank,
                                                tokens.device)
        out["position_ids"] = positions.unsqueeze(0).expand(tokens.size(0), -1).contiguous()
    return out


def merge_batch_from_cp_ranks(
        batches: Sequence[Dict[str, Optional[torch.Tensor]]]) -> Dict[str, Optional[torch.Tensor]]:
    """Inverse of :func:`get_batch_on_this_cp_rank` given every rank's local batch."""
    out: Dict[str, Optional[torch.Tensor]] = {}
    for key, value in batches[0].items():
        if value is not None and key in _BATCH_SEQ_DIMS and len(batches) > 1:
            value = merge_cp_shards([b[key] for b in batches], _BATCH_SEQ_DIMS[key])
        out[key] = value
    return out


def gather_from_context_parallel_ranks(tensor: torch.Tensor, seq_dim: int,
                                       cp_group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather the cp shards of ``tensor`` and put the sequence back in global order.

    ``[.., s/cp, ..]`` on each rank -> ``[.., s, ..]`` on every rank (no autograd; for
    outputs, losses per token and tests).
    """
    cp_size = dist.get_world_size(cp_group)
    if cp_size == 1:
        return tensor
    local = tensor.contiguous()
    # Flat buffer: gloo cannot gather into a stacked output (docs/ARCHITECTURE.md, "gloo on CPU").
    flat = torch.empty(cp_size * local.numel(), dtype=local.dtype, device=local.device)
    collectives.all_gather_single(flat, local.view(-1), group=cp_group)
    # [cp * numel] -> cp x [.., s/cp, ..]
    shards = flat.view(cp_size, *local.shape).unbind(0)
    return merge_cp_shards(shards, seq_dim)
