"""Top-k router: which experts each token goes to, and with what weight.

``logits = x W_r^T`` in float32 (``W_r`` is ``[E, h]``, replicated on every rank), then per
``moe_router_score_function`` / ``moe_router_pre_softmax``:

=====================  ==========================================  ===========================
scores                 experts chosen by                           routing probabilities
=====================  ==========================================  ===========================
softmax (default)      top-k of ``logits (+ bias)``                softmax over the k logits
softmax, pre-softmax   top-k of ``softmax(logits) (+ bias)``       the k softmax values
sigmoid                top-k of ``sigmoid(logits) (+ bias)``       the k sigmoids / their sum
=====================  ==========================================  ===========================

(times ``moe_router_topk_scaling_factor`` when set; with ``moe_router_num_groups`` the
choice is first limited to each token's best expert groups, DeepSeek-V3). The expert bias (aux-loss-free
balancing) only changes which experts are chosen, never the probabilities.

Capacity dropping (``token_dropping``), the load-balancing loss and the z-loss
(``load_balancing``) are applied here, the losses attached to the graph with
``MoEAuxLossAutoScaler``.

Shapes: ``s`` local sequence, ``b`` batch, ``T = s * b`` tokens on this rank, ``h`` hidden,
``E`` experts. Under sequence parallelism each tp rank routes its own slice of the
sequence; the router weight's gradient is then a partial sum, marked
``sequence_parallel=True`` so ``finalize_model_grads`` sums it over tp.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore import device
from megacore.parallel_state import ProcessGroupCollection
from megacore.tensor_parallel.mappings import all_reduce
from megacore.transformer.module import MegatronModule
from megacore.transformer.moe.load_balancing import (
    MoEAuxLossAutoScaler,
    sequence_load_balancing_loss,
    switch_load_balancing_loss,
    z_loss,
)
from megacore.transformer.moe.token_dropping import (
    drop_tokens_over_capacity,
    expert_capacity,
)

__all__ = ["TopKRouter", "RoutingResult", "topk_routing", "group_limited_choice",
           "compute_routing_scores_for_aux_loss"]


@dataclasses.dataclass
class RoutingResult:
    """What the router decided for this rank's ``T`` tokens.

    Attributes:
        probs: ``[T, E]`` fp32 routing weights, 0 where a token does not go (or was dropped).
        routing_map: ``[T, E]`` bool, True where token t is processed by expert e.
        tokens_per_expert: ``[E]`` assignments per expert before dropping (this rank).
        num_dropped: assignments dropped for capacity (this rank).
        load_balancing_loss: this rank's share of the balancing loss without its
            coefficient (detached; 1.0 means balanced), or None.
        z_loss: this rank's share of the z-loss without its coefficient (detached), or None.
    """

    probs: torch.Tensor
    routing_map: torch.Tensor
    tokens_per_expert: torch.Tensor
    num_dropped: torch.Tensor
    load_balancing_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None


def group_limited_choice(for_choice: torch.Tensor, topk: int, num_groups: int,
                         group_topk: int) -> torch.Tensor:
    """``for_choice [T, E]`` with the experts outside each token's best groups set to -inf.

    The experts form ``num_groups`` contiguous groups (``E / num_groups`` each, e.g. the
    experts of one node); a group's score is the sum of its best ``topk // group_topk``
    scores, and each token keeps its ``group_topk`` best groups. Worked example, E=8,
    4 groups of 2, topk=2, group_topk=2: scores ``[.9 .1 | .2 .2 | .8 .7 | .0 .3]`` give
    group scores ``[.9 .2 .8 .3]`` (best 1 per group), groups 0 and 2 are kept, and the
    top-2 experts are chosen among ``{0, 1, 4, 5}``: experts 0 and 4.
    """
    tokens, experts = for_choice.shape
    grouped = for_choice.view(tokens, num_groups, experts // num_groups)  # [T, G, E/G]
    group_scores = grouped.topk(topk // group_topk, dim=-1).values.sum(dim=-1)  # [T, G]
    keep_groups = group_scores.topk(group_topk, dim=-1).indices  # [T, group_topk]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, keep_groups, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)  # [T, E]
    return for_choice.masked_fill(~keep, float("-inf"))


def topk_routing(logits: torch.Tensor, topk: int, score_function: str = "softmax",
                 pre_softmax: bool = False, expert_bias: Optional[torch.Tensor] = None,
                 scaling_factor: Optional[float] = None, num_groups: Optional[int] = None,
                 group_topk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Choose ``topk`` experts per token (table in the module docstring).

    Args:
        logits: ``[T, E]`` fp32.
        num_groups, group_topk: group-limited routing (:func:`group_limited_choice`),
            applied to the scores used for the choice (bias included).

    Returns:
        ``(probs [T, E], routing_map [T, E] bool)``.
    """
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1) if pre_softmax else logits
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"moe_router_score_function must be 'softmax' or 'sigmoid', "
                         f"got {score_function!r}")
    for_choice = scores if expert_bias is None else scores + expert_bias
    if num_groups is not None:
        for_choice = group_limited_choice(for_choice, topk, num_groups, group_topk)
    top_indices = torch.topk(for_choice.detach(), k=topk, dim=-1).indices  # [T, k]
    top_scores = torch.gather(scores, 1, top_indices)  # [T, k]
    if score_function == "softmax" and not pre_softmax:
        top_probs = torch.softmax(top_scores, dim=-1)
    elif score_function == "sigmoid" and topk > 1:
        top_probs = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        top_probs = top_scores
    if scaling_factor is not None:
        top_probs = top_probs * scaling_factor
    probs = torch.zeros_like(logits).scatter(1, top_indices, top_probs)  # [T, E]
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_indices, True)
    return probs, routing_map


def compute_routing_scores_for_aux_loss(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Scores over all experts that the balancing loss uses: ``[T, E]``, rows sum to 1."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


class TopKRouter(MegatronModule):
    """Learned linear router with top-k selection, capacity dropping and balancing losses.

    Args:
        config: a config with the MoE fields (``MoEConfig``) and ``hidden_size``.
        pg_collection: process groups; the tp x cp group defines the token domain of the
            balancing loss (a micro-batch's tokens split over tp and cp).

    forward(hidden_states ``[s, b, h]``, this rank's tokens) returns a :class:`RoutingResult`.
    """

    def __init__(self, config, pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.tp_cp_group = self.pg_collection.tp_cp
        self.tp_cp_size = dist.get_world_size(self.tp_cp_group)
        # Gradient scale of the aux and z losses (loss scale / micro-batches): this router's
        # own, set per step by set_moe_aux_loss_scale, never a process-wide value.
        self.aux_loss_scale = 1.0
        # Each cp rank attaches its share of the aux and z losses; the shares' gradients must
        # be summed over cp, but DistributedDataParallel averages over dp x cp. Scale the
        # shares by cp as the main loss is (context_parallel/loss_reduction.py). With the
        # per-token loss gradients are summed, not averaged, and no factor is needed.
        cp_size = dist.get_world_size(self.pg_collection.cp)
        self._cp_share_factor = 1 if config.calculate_per_token_loss else cp_size
        self.weight = torch.nn.Parameter(torch.empty(self.num_experts, config.hidden_size,
                                                     dtype=config.params_dtype,
                                                     device=device.current_device()))
        if config.perform_initialization:
            master = torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32)
            config.init_method(master)
            with torch.no_grad():
                self.weight.copy_(master)
        # Every tp rank routes a different slice of the tokens (the MoE layer splits them even
        # without sequence parallelism), so the grad is a partial sum over tp.
        self.weight.sequence_parallel = self.tp_size > 1
        if config.moe_router_enable_expert_bias:
            # Saved with the model (it is learned state); the counts are per step only.
            self.register_buffer("expert_bias", torch.zeros(self.num_experts,
                                                            device=device.current_device()))
            self.register_buffer("local_tokens_per_expert",
                                 torch.zeros(self.num_experts, dtype=torch.float64,
                                             device=device.current_device()),
                                 persistent=False)
        else:
            self.expert_bias = None

    def forward(self, hidden_states: torch.Tensor) -> RoutingResult:
        s, b, h = hidden_states.shape
        # Routing decisions in fp32 whatever the params dtype: ties and small probs matter.
        logits = F.linear(hidden_states.reshape(s * b, h).float(), self.weight.float())  # [T, E]
        z_value = None
        if self.config.moe_z_loss_coeff is not None:
            z_share = z_loss(logits, s * b * self.tp_cp_size, 1.0)
            if self._attach_losses():
                logits = MoEAuxLossAutoScaler.apply(
                    logits, z_share * (self.config.moe_z_loss_coeff * self._cp_share_factor),
                    self.aux_loss_scale)
            z_value = z_share.detach()
        probs, routing_map = topk_routing(
            logits, self.topk, self.config.moe_router_score_function,
            self.config.moe_router_pre_softmax, self.expert_bias,
            self.config.moe_router_topk_scaling_factor, self.config.moe_router_num_groups,
            self.config.moe_router_group_topk)
        tokens_per_expert = routing_map.sum(dim=0)  # [E], before dropping
        if self.expert_bias is not None and self.training:
            self.local_tokens_per_expert += tokens_per_expert.to(torch.float64)
        probs, balance_value = self._attach_balancing_loss(logits, probs, routing_map, s, b)
        num_dropped = torch.zeros((), dtype=torch.long, device=logits.device)
        if self.config.moe_expert_capacity_factor is not None:
            capacity = expert_capacity(s * b, self.topk, self.num_experts,
                                       self.config.moe_expert_capacity_factor)
            probs, routing_map = drop_tokens_over_capacity(
                probs, routing_map, capacity, self.config.moe_token_drop_policy)
            num_dropped = tokens_per_expert.sum() - routing_map.sum()
        return RoutingResult(probs, routing_map, tokens_per_expert, num_dropped,
                             balance_value, z_value)

    def _attach_losses(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _attach_balancing_loss(self, logits, probs, routing_map, s, b):
        """Attach this rank's share of the balancing loss to ``probs``; return its value."""
        kind = self.config.moe_router_load_balancing_type
        if kind == "none":
            return probs, None
        scores = compute_routing_scores_for_aux_loss(logits, self.config.moe_router_score_function)
        if kind == "aux_loss":
            # [E] counts over the whole micro-batch (all tp x cp ranks).
            counts = all_reduce(routing_map.sum(dim=0).float(), self.tp_cp_group)
            share = switch_load_balancing_loss(scores, counts, s * b * self.tp_cp_size,
                                               self.topk, 1.0)
        else:  # "seq_aux_loss": [T, E] -> [s, b, E]; counts per sequence [b, E]
            counts = all_reduce(routing_map.view(s, b, -1).sum(dim=0).float(), self.tp_cp_group)
            share = sequence_load_balancing_loss(scores.view(s, b, -1), counts,
                                                 s * self.tp_cp_size, self.topk, 1.0)
        coeff = self.config.moe_aux_loss_coeff
        if coeff > 0 and self._attach_losses():
            probs = MoEAuxLossAutoScaler.apply(probs, share * (coeff * self._cp_share_factor),
                                               self.aux_loss_scale)
        return probs, share.detach()
