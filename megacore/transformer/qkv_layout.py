"""Row layout of the fused query/key/value projection, and how tp ranks share it.

The logical (single-process) weight of ``linear_qkv`` has ``ng * (np/ng + 2) * hn`` rows,
grouped per key/value head as in Megatron-Core::

    [ng, np/ng + 2, hn]:   group g = [q heads of g (np/ng of them), k_g, v_g]

When ``ng >= tp`` the ColumnParallelLinear split hands each rank ``ng/tp`` whole groups,
so that layout is also the tp layout. When ``ng < tp`` a group's query heads are spread
over ``r = tp/ng`` ranks, and each of those ranks needs ``k_g, v_g``. We then use
``tp`` *virtual groups*, one per rank, each with ``np/tp`` query heads and a replica of
its group's key/value heads::

    [tp, np/tp + 2, hn]:   virtual group j = [q heads j*np/tp .. (j+1)*np/tp - 1,
                                              k_{j // r}, v_{j // r}]

Worked example: np=4, ng=1 (multi-query), hn=1, tp=2. Logical rows
``[q0 q1 q2 q3 k v]``; expanded ``[q0 q1 k v | q2 q3 k v]``; rank 0 keeps the first 4
rows, rank 1 the last 4.

The replicas must stay equal, so each replica's key/value weight gradient (computed from
its own query heads only) is summed over the replicas of the group
(:func:`sum_grads_over_kv_replicas`); then every replica holds the full gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["num_virtual_groups", "expand_qkv_rows", "collapse_qkv_rows",
           "sum_grads_over_kv_replicas"]


def num_virtual_groups(num_attention_heads: int, num_query_groups: int, tp_size: int) -> int:
    """Groups in the tp layout: ``ng`` when each rank holds whole groups, else ``tp``."""
    del num_attention_heads
    return max(num_query_groups, tp_size)


def expand_qkv_rows(logical: torch.Tensor, *, num_attention_heads: int, num_query_groups: int,
                    kv_channels: int, tp_size: int) -> torch.Tensor:
    """Logical ``[ng*(np/ng+2)*hn, ...]`` rows -> tp layout ``[nvg*(np/nvg+2)*hn, ...]``."""
    np_, ng, hn = num_attention_heads, num_query_groups, kv_channels
    if ng >= tp_size:
        return logical
    r, qpg, qv = tp_size // ng, np_ // ng, np_ // tp_size
    rest = tuple(logical.shape[1:])
    x = logical.reshape(ng, qpg + 2, hn, *rest)
    q = x[:, :qpg].reshape(ng, r, qv, hn, *rest)               # a group's q heads in r parts
    kv = x[:, qpg:].unsqueeze(1).expand(ng, r, 2, hn, *rest)   # k_g, v_g for each replica
    return torch.cat((q, kv), dim=2).reshape(tp_size * (qv + 2) * hn, *rest)


def collapse_qkv_rows(expanded: torch.Tensor, *, num_attention_heads: int,
                      num_query_groups: int, kv_channels: int, tp_size: int) -> torch.Tensor:
    """Inverse of :func:`expand_qkv_rows` (key/value rows taken from the first replica)."""
    np_, ng, hn = num_attention_heads, num_query_groups, kv_channels
    if ng >= tp_size:
        return expanded
    r, qv = tp_size // ng, np_ // tp_size
    rest = tuple(expanded.shape[1:])
    x = expanded.reshape(ng, r, qv + 2, hn, *rest)
    q = x[:, :, :qv].reshape(ng, r * qv, hn, *rest)
    kv = x[:, 0, qv:]
    return torch.cat((q, kv), dim=1).reshape(ng * (np_ // ng + 2) * hn, *rest)


class _SumKVGradsOverReplicas(torch.autograd.Function):
    """forward: identity; backward: the key/value rows' gradient is summed over the ranks
    that hold replicas of the same group (query rows pass through)."""

    @staticmethod
    def forward(ctx, shard, num_q_heads, kv_channels, group_index, num_groups, tp_group):
        ctx.meta = (num_q_heads, kv_channels, group_index, num_groups, tp_group)
        return shard.view_as(shard)

    @staticmethod
    def backward(ctx, grad):
        num_q_heads, hn, group_index, num_groups, tp_group = ctx.meta
        rows_q = num_q_heads * hn
        grad = grad.contiguous()
        kv = grad[rows_q:]                                    # [2*hn, ...]
        # Slot per group, all-reduced over tp: replicas of group g add into slot g.
        slots = torch.zeros((num_groups,) + tuple(kv.shape), dtype=grad.dtype,
                            device=grad.device)
        slots[group_index].copy_(kv)
        dist.all_reduce(slots, group=tp_group)
        return (torch.cat((grad[:rows_q], slots[group_index])),
                None, None, None, None, None)


def sum_grads_over_kv_replicas(shard: torch.Tensor, *, num_attention_heads: int,
                               num_query_groups: int, kv_channels: int,
                               tp_group: dist.ProcessGroup) -> torch.Tensor:
    """Wrap this rank's fused QKV weight or bias so its key/value gradient is summed over
    the group's replicas; identity when ``ng >= tp`` (no replicas)."""
    tp_size = dist.get_world_size(tp_group)
    if num_query_groups >= tp_size:
        return shard
    group_index = dist.get_rank(tp_group) // (tp_size // num_query_groups)
    return _SumKVGradsOverReplicas.apply(shard, num_attention_heads // tp_size, kv_channels,
                                         group_index, num_query_groups, tp_group)
