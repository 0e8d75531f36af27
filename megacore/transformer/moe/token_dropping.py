"""Expert capacity and token dropping.

With ``moe_expert_capacity_factor`` set, each expert takes at most::

    capacity = ceil(T * k / E * capacity_factor)

of the ``T`` tokens on this rank (``k`` top-k, ``E`` experts). Assignments beyond that are
dropped: the token skips that expert (its other experts still count, and the residual
connection carries it). Which assignments survive is the drop policy:

* ``"probs"``: the ``capacity`` assignments with the highest routing probability (ties:
  the earlier token);
* ``"position"``: the first ``capacity`` tokens in token order (``[s, b]`` flattened).

Worked example: T=4, k=1, E=2, factor 1 -> capacity 2. Tokens 0, 1, 3 pick expert 0 with
probs 0.6, 0.9, 0.7: ``"probs"`` keeps tokens 1 and 3; ``"position"`` keeps 0 and 1.

Capacity is counted over the tokens of this rank, before dispatch (as in Megatron-Core), so
it does not depend on the expert-parallel layout, but it does on the tp/cp split of the
sequence.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["expert_capacity", "drop_tokens_over_capacity"]


def expert_capacity(num_tokens: int, topk: int, num_experts: int,
                    capacity_factor: float) -> int:
    """``ceil(num_tokens * topk / num_experts * capacity_factor)``."""
    return int(math.ceil(num_tokens * topk / num_experts * capacity_factor))


def drop_tokens_over_capacity(probs: torch.Tensor, routing_map: torch.Tensor, capacity: int,
                              drop_policy: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` tokens per expert.

    Args:
        probs: ``[T, E]`` routing probabilities (0 where not routed).
        routing_map: ``[T, E]`` bool, True where token t goes to expert e.
        capacity: tokens each expert may take.
        drop_policy: ``"probs"`` or ``"position"`` (module docstring).

    Returns:
        ``(probs, routing_map)`` with dropped assignments set to 0 / False.
    """
    num_tokens = routing_map.size(0)
    if drop_policy == "probs":
        # Rank assignments per expert by prob, descending; a stable sort breaks ties by token.
        key = torch.where(routing_map, probs.detach(), torch.full_like(probs, -1.0))
        order = torch.sort(key, dim=0, descending=True, stable=True).indices  # [T, E]
        rank = torch.empty_like(order)
        rank.scatter_(0, order, torch.arange(num_tokens, device=order.device)
                      .unsqueeze(1).expand_as(order))
    elif drop_policy == "position":
        rank = torch.cumsum(routing_map.long(), dim=0) - 1  # position among e's tokens
    else:
        raise ValueError(f"moe_token_drop_policy must be 'probs' or 'position', "
                         f"got {drop_policy!r}")
    keep = routing_map & (rank < capacity)
    return probs * keep, keep
