"""Token dispatchers: bring each routed token to the rank of its expert, and back.

Experts are split over the expert-parallel (ep) group: rank ``r`` of it holds experts
``r * E/ep ... (r + 1) * E/ep - 1`` (``E`` experts), each expert possibly split again over
the expert-tensor-parallel (etp) group. Every rank starts with its own, distinct tokens
(the MoE layer splits the sequence over tp when sequence parallelism is off).

Two interchangeable dispatchers, both dropless unless the router dropped tokens:

``MoEAllGatherTokenDispatcher`` (``"allgather"``)::

    [T, h] -> all-gather over ep -> all-gather over etp -> [etp*ep*T, h]
    -> keep the rows routed to local experts, grouped by expert -> experts
    -> weight by prob, add into [etp*ep*T, h] (only local experts' terms)
    -> keep own etp block -> reduce-scatter over ep (sums the experts of all ep ranks) -> [T, h]

``MoEAlltoAllTokenDispatcher`` (``"alltoall"``)::

    [T, h] -> group by expert [N, h] -> all-to-all over ep (each row to its expert's rank)
    -> all-gather over etp (uneven) -> sort rows (source, expert) -> (expert, source)
    -> experts -> inverse sort -> keep own etp rows -> all-to-all back [N, h]
    -> weight by prob, add into [T, h]

Worked example (alltoall, E=4, ep=2, etp=1): rank 0 routes 3 tokens to experts 0 and 2,
rank 1 routes 2 tokens to expert 1. Rank 0 sends 1 row to rank 1 (expert 2) and keeps 2;
rank 1 sends 2 rows to rank 0 (expert 1) and keeps none. Rank 0 receives rows in (source,
expert) order ``[e0, e0 | e1, e1]`` and rank 1 receives ``[e2 | ]``; a rank whose experts get
no tokens receives ``[0, h]`` and still takes part in every collective.

Contract with the experts: on entry every etp rank holds the same rows; the experts return
their full output on every etp rank (their last linear all-reduces over etp), so the
adjoint of the etp gather is "keep own rows" (see ``expert_parallel_comm``).

Shapes: ``T`` tokens on this rank, ``h`` hidden, ``E`` experts, ``El = E/ep`` local experts,
``N`` routed rows.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megacore.parallel_state import ProcessGroupCollection
from megacore.tensor_parallel.mappings import (
    all_gather_along_dim,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megacore.transformer.moe.expert_parallel_comm import (
    all_gather_counts,
    all_to_all,
    gather_variable_along_first_dim,
    split_variable_along_first_dim,
)
from megacore.transformer.moe.token_dropping import expert_capacity
from megacore.transformer.moe.token_permutation import (
    chunk_order,
    permute,
    sort_chunks,
    unpermute,
)

__all__ = ["MoETokenDispatcher", "MoEAllGatherTokenDispatcher", "MoEAlltoAllTokenDispatcher",
           "build_token_dispatcher"]


class MoETokenDispatcher:
    """Base: the groups and this rank's experts.

    Args:
        num_local_experts: experts on this rank (``E / ep``).
        config: MoE config.
        pg_collection: process groups (``ep`` and ``expt_tp`` are used).

    ``token_permutation(hidden [T, h], probs [T, E], routing_map [T, E])`` returns
    ``(expert_input [N, h], tokens_per_local_expert [El])`` with rows grouped by local
    expert; ``token_unpermutation(expert_output [N, h])`` returns ``[T, h]``. The two calls
    are a pair: state is kept between them.
    """

    def __init__(self, num_local_experts: int, config, pg_collection: ProcessGroupCollection):
        self.config = config
        self.num_experts = config.num_moe_experts
        self.num_local_experts = num_local_experts
        self.ep_group, self.etp_group = pg_collection.ep, pg_collection.expt_tp
        self.ep_size = dist.get_world_size(self.ep_group)
        self.etp_size = dist.get_world_size(self.etp_group)
        first = dist.get_rank(self.ep_group) * num_local_experts
        self.local_experts = slice(first, first + num_local_experts)

    def token_permutation(self, hidden_states: torch.Tensor, probs: torch.Tensor,
                          routing_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def token_unpermutation(self, expert_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MoEAllGatherTokenDispatcher(MoETokenDispatcher):
    """Every rank of the ep x etp group sees all its tokens and serves its own experts."""

    def token_permutation(self, hidden_states, probs, routing_map):
        # [T, h] -> all-gather ep (bwd: reduce-scatter, each rank's grads are partial sums
        # over its experts) -> all-gather etp (bwd: keep own, grads replicated) -> [Ng, h]
        hidden_states = self._gather(hidden_states)
        probs = self._gather(probs)
        routing_map = self._gather_map(routing_map)
        self.num_gathered = hidden_states.size(0)
        expert_input, self.permuted_probs, self.token_ids, counts = permute(
            hidden_states, routing_map[:, self.local_experts], probs[:, self.local_experts])
        return expert_input, counts

    def token_unpermutation(self, expert_output):
        # [N, h] -> weighted sum into [Ng, h] (this rank's experts only)
        out = unpermute(expert_output, self.token_ids, self.permuted_probs, self.num_gathered)
        out = scatter_to_sequence_parallel_region(out, self.etp_group)  # [ep*T, h]
        return reduce_scatter_to_sequence_parallel_region(out, self.ep_group)  # [T, h]

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        x = gather_from_sequence_parallel_region(x, True, self.ep_group)
        return gather_from_sequence_parallel_region(x, False, self.etp_group)

    def _gather_map(self, routing_map: torch.Tensor) -> torch.Tensor:
        as_int = routing_map.to(torch.int32)  # [T, E]; gloo all-gather of bool is not portable
        as_int = all_gather_along_dim(as_int, 0, self.ep_group)
        return all_gather_along_dim(as_int, 0, self.etp_group).bool()


class MoEAlltoAllTokenDispatcher(MoETokenDispatcher):
    """Each routed row travels only to the ep rank of its expert (module docstring)."""

    def token_permutation(self, hidden_states, probs, routing_map):
        self.num_tokens = hidden_states.size(0)
        capacity = self._padded_capacity(self.num_tokens)
        permuted, self.permuted_probs, self.token_ids, counts = permute(
            hidden_states, routing_map, probs, capacity)
        send = counts.view(self.ep_size, self.num_local_experts)  # [ep (dest), El]
        recv = send if capacity is not None else self._exchange_counts(send)  # [ep (src), El]
        self.input_splits = send.sum(dim=1).tolist()
        self.output_splits = recv.sum(dim=1).tolist()
        # [N, h] -> all-to-all over ep -> [N_recv, h] in (source, local expert) order
        x = all_to_all(permuted, self.output_splits, self.input_splits, self.ep_group)
        chunks = recv  # [sources, El]
        if self.etp_size > 1:
            per_etp = all_gather_counts(recv, self.etp_group)  # [etp, ep, El]
            self.etp_sizes = per_etp.sum(dim=(1, 2)).tolist()
            x = gather_variable_along_first_dim(x, self.etp_sizes, self.etp_group)
            chunks = per_etp.reshape(-1, self.num_local_experts)  # [etp * ep, El]
        self.chunks = chunks
        # (source, expert) -> (expert, source): each local expert's rows contiguous
        x = sort_chunks(x, chunks.flatten().tolist(), chunk_order(*chunks.shape))
        return x, chunks.sum(dim=0)

    def token_unpermutation(self, expert_output):
        sources, local = self.chunks.shape
        # (expert, source) -> (source, expert)
        y = sort_chunks(expert_output, self.chunks.t().flatten().tolist(),
                        chunk_order(local, sources))
        if self.etp_size > 1:
            y = split_variable_along_first_dim(y, self.etp_sizes, self.etp_group)
        y = all_to_all(y, self.input_splits, self.output_splits, self.ep_group)  # [N, h]
        return unpermute(y, self.token_ids, self.permuted_probs, self.num_tokens)  # [T, h]

    def _padded_capacity(self, num_tokens: int) -> Optional[int]:
        if not self.config.moe_pad_expert_input_to_capacity:
            return None
        return expert_capacity(num_tokens, self.config.moe_router_topk, self.num_experts,
                               self.config.moe_expert_capacity_factor)

    def _exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        if self.ep_size == 1:
            return send
        send = send.contiguous()
        recv = torch.empty_like(send)  # row r: what rank r sends to each of my experts
        dist.all_to_all_single(recv, send, group=self.ep_group)
        return recv


def build_token_dispatcher(num_local_experts: int, config,
                           pg_collection: ProcessGroupCollection) -> MoETokenDispatcher:
    """The dispatcher named by ``config.moe_token_dispatcher_type``."""
    kinds = {"allgather": MoEAllGatherTokenDispatcher, "alltoall": MoEAlltoAllTokenDispatcher}
    return kinds[config.moe_token_dispatcher_type](num_local_experts, config, pg_collection)
