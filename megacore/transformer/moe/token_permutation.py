"""Reordering tokens between token order and expert order.

``permute`` lists, expert by expert, the tokens routed to it (in token order within an
expert); ``unpermute`` adds each expert output back into its token's row, weighted by the
routing probability. Example with T=3, E=2 and routing map rows ``[1,1], [0,1], [1,0]``::

    token_ids  = [0, 2 | 0, 1]        (expert 0 | expert 1)
    tokens_per_expert = [2, 2]

With ``capacity`` (padding to capacity) every expert gets exactly ``capacity`` rows; the
padding rows read a zero token and are discarded on the way back (they point at row ``T``
of a ``[T + 1, h]`` buffer).

``sort_chunks`` reorders row blocks, e.g. tokens received from each source rank grouped
by local expert, ``(source, expert)`` order, into ``(expert, source)`` order, so each
local expert's tokens are contiguous.

Shapes: ``T`` tokens, ``h`` hidden, ``E`` experts, ``N`` routed rows.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["permute", "unpermute", "sort_chunks", "chunk_order"]


def permute(tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor,
            capacity: Optional[int] = None
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group tokens by expert.

    Args:
        tokens: ``[T, h]``.
        routing_map: ``[T, E]`` bool.
        probs: ``[T, E]`` routing probabilities.
        capacity: pad every expert to exactly this many rows (each expert must have at
            most ``capacity`` tokens); None: no padding.

    Returns:
        ``(permuted [N, h], permuted_probs [N], token_ids [N], tokens_per_expert [E])`` with
        ``token_ids`` the source row of each permuted row (``T`` for padding rows).
    """
    num_tokens = tokens.size(0)
    mask = routing_map.t()  # [E, T]
    ids = torch.arange(num_tokens, device=tokens.device).expand_as(mask)
    token_ids = ids[mask]  # [N], expert-major, token order within an expert
    permuted_probs = probs.t()[mask]  # [N]
    tokens_per_expert = mask.sum(dim=1)  # [E]
    if capacity is not None:
        # Row slot of each assignment: expert * capacity + its rank among e's tokens.
        slot = (torch.cumsum(mask.long(), dim=1) - 1
                + torch.arange(mask.size(0), device=mask.device).unsqueeze(1) * capacity)[mask]
        padded_ids = torch.full((mask.size(0) * capacity,), num_tokens, dtype=torch.long,
                                device=tokens.device)
        token_ids = padded_ids.index_copy(0, slot, token_ids)
        permuted_probs = permuted_probs.new_zeros(padded_ids.numel()).index_copy(
            0, slot, permuted_probs)
        tokens_per_expert = torch.full_like(tokens_per_expert, capacity)
        tokens = torch.cat([tokens, tokens.new_zeros(1, tokens.size(1))])  # row T: padding
    return tokens.index_select(0, token_ids), permuted_probs, token_ids, tokens_per_expert


def unpermute(expert_output: torch.Tensor, token_ids: torch.Tensor,
              permuted_probs: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Sum ``prob * output`` of every row into its token: ``[N, h] -> [T, h]``.

    ``permuted_probs`` None: add the rows unweighted (the probabilities were applied
    already). Rows with ``token_ids == T`` (padding) are discarded.
    """
    rows = expert_output
    if permuted_probs is not None:
        rows = (rows.float() * permuted_probs.unsqueeze(-1)).to(expert_output.dtype)
    out = rows.new_zeros(num_tokens + 1, rows.size(-1))  # [T + 1, h], row T collects padding
    return out.index_add(0, token_ids, rows)[:num_tokens]


def chunk_order(num_rows: int, num_cols: int) -> List[int]:
    """Chunk indices of a row-major ``[rows, cols]`` grid read column-major.

    Example: ``chunk_order(2, 3) == [0, 3, 1, 4, 2, 5]``.
    """
    return [r * num_cols + c for c in range(num_cols) for r in range(num_rows)]


def sort_chunks(x: torch.Tensor, split_sizes: Sequence[int], order: Sequence[int]) -> torch.Tensor:
    """Cut ``x`` into row chunks of ``split_sizes`` and concatenate them in ``order``."""
    chunks = torch.split(x, [int(n) for n in split_sizes], dim=0)
    return torch.cat([chunks[i] for i in order], dim=0)
