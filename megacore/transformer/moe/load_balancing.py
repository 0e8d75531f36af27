"""Router losses that keep experts evenly loaded, and the expert-bias alternative.

* Switch/GShard load-balancing loss (``"aux_loss"``), over the ``T`` tokens of a micro-batch::

      aux = coeff * E / (k * T^2) * sum_e P_e * n_e

  with ``P_e`` the sum over tokens of expert e's score (softmax over all experts, or the
  normalized sigmoid), ``n_e`` the number of tokens routed to e (before dropping), ``k`` the
  top-k and ``E`` the number of experts. Equals ``coeff * E * sum_e f_e p_e`` with
  ``f_e = n_e / (k T)`` and ``p_e = P_e / T``; 1 * coeff when perfectly balanced.
* Sequence-level loss (``"seq_aux_loss"``): the same per sequence of length ``S``, averaged
  over the ``b`` sequences.
* z-loss (ST-MoE): ``coeff * mean_t logsumexp(logits_t)^2``.

Token domain: a micro-batch ``[s, b]`` may be split over the tp (sequence parallelism) and
cp ranks. Each rank computes its *share*: its own scores ``P`` (so the gradient stays local)
times the counts ``n`` summed over the tp x cp group, divided by the global ``T``. The shares
add up over tp x cp to the loss of the whole micro-batch, and so do their gradients once the
router weight's grad is summed over tp (``sequence_parallel=True``) - which is what makes the
parallel router equal the single-process one.

Losses enter the graph through :class:`MoEAuxLossAutoScaler` (Megatron's trick): the loss is
attached to an activation and its gradient is injected during that activation's backward,
scaled by the router's ``aux_loss_scale`` (the training step sets it with
:func:`set_moe_aux_loss_scale` to ``loss_scale / num_microbatches`` so aux losses are scaled
like the main loss).

Expert bias (aux-loss-free balancing, DeepSeek-V3): after each step
``bias += rate * sign(mean_e(n) - n)`` over the tokens of the step on all ranks;
:func:`update_router_expert_bias` does that for every router of a model.

Shapes: ``T`` tokens on this rank, ``E`` experts, ``s`` local sequence, ``b`` batch.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megacore import parallel_state
from megacore.deprecation import warn_deprecated

__all__ = [
    "MoEAuxLossAutoScaler",
    "set_moe_aux_loss_scale",
    "switch_load_balancing_loss",
    "sequence_load_balancing_loss",
    "z_loss",
    "get_updated_expert_bias",
    "update_router_expert_bias",
]


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Attach an auxiliary loss to an activation.

    forward(output, aux_loss, scale): returns ``output`` unchanged.
    backward: passes ``output``'s gradient through and gives ``aux_loss`` the gradient
    ``scale`` (as if ``scale * aux_loss`` had been added to the main loss).

    The scale is an argument, captured at forward time: each router passes its own
    (:func:`set_moe_aux_loss_scale` sets it on the routers of one model), so two models in
    one process never share it. Without ``scale`` the class default of the deprecated
    :meth:`set_loss_scale` is used (Megatron's global, kept for callers that set it).
    """

    main_loss_backward_scale: torch.Tensor = torch.tensor(1.0)

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale=None):
        ctx.save_for_backward(aux_loss)
        ctx.scale = MoEAuxLossAutoScaler.main_loss_backward_scale if scale is None else scale
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scale = torch.as_tensor(ctx.scale, dtype=torch.float32).to(aux_loss.device)
        return grad_output, torch.ones_like(aux_loss) * scale, None

    @staticmethod
    def set_loss_scale(scale) -> None:
        """Deprecated process-wide default scale of the aux-loss gradients (Megatron's
        API); pass ``scale`` to :meth:`apply`, or use :func:`set_moe_aux_loss_scale`."""
        warn_deprecated("MoEAuxLossAutoScaler.set_loss_scale", since="0.2.0",
                        removed_in="0.4.0",
                        alternative="megacore.transformer.moe.set_moe_aux_loss_scale(model, "
                                    "scale)")
        MoEAuxLossAutoScaler.main_loss_backward_scale = torch.as_tensor(
            scale, dtype=torch.float32).detach().clone()


def set_moe_aux_loss_scale(modules, scale: float) -> int:
    """Set the aux-loss gradient scale (e.g. ``loss_scale / num_microbatches``) on every
    router inside ``modules`` (a module or a list of model chunks); returns how many."""
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    routers = [m for module in modules for m in module.modules()
               if hasattr(m, "aux_loss_scale")]
    for router in routers:
        router.aux_loss_scale = float(scale)
    return len(routers)


def switch_load_balancing_loss(scores: torch.Tensor, tokens_per_expert: torch.Tensor,
                               total_num_tokens: int, topk: int, coeff: float) -> torch.Tensor:
    """This rank's share of the Switch loss (module docstring).

    Args:
        scores: ``[T, E]`` fp32 scores of this rank's tokens over all experts.
        tokens_per_expert: ``[E]`` tokens routed to each expert over the whole token domain.
        total_num_tokens: tokens in the whole domain (``T`` times the tp x cp size).
        topk: experts per token.
        coeff: loss weight.
    """
    num_experts = scores.size(-1)
    aggregated = scores.sum(dim=0)  # [E]
    scale = num_experts * coeff / (topk * total_num_tokens * total_num_tokens)
    return torch.sum(aggregated * tokens_per_expert.to(aggregated.dtype)) * scale


def sequence_load_balancing_loss(scores: torch.Tensor, tokens_per_expert_per_seq: torch.Tensor,
                                 seq_length: int, topk: int, coeff: float) -> torch.Tensor:
    """This rank's share of the per-sequence loss.

    Args:
        scores: ``[s, b, E]`` fp32 scores of this rank's slice of each sequence.
        tokens_per_expert_per_seq: ``[b, E]`` tokens routed to each expert per sequence,
            over the whole sequence (summed over tp x cp).
        seq_length: full sequence length ``S``.
        topk: experts per token.
        coeff: loss weight.
    """
    num_experts = scores.size(-1)
    aggregated = scores.sum(dim=0)  # [s, b, E] -> [b, E]
    scale = num_experts * coeff / (topk * seq_length * seq_length)
    per_seq = (aggregated * tokens_per_expert_per_seq.to(aggregated.dtype)).sum(dim=-1)  # [b]
    return per_seq.mean() * scale


def z_loss(logits: torch.Tensor, total_num_tokens: int, coeff: float) -> torch.Tensor:
    """This rank's share of ``coeff * mean(logsumexp(logits)^2)`` over ``total_num_tokens``.

    Args:
        logits: ``[T, E]`` fp32 router logits of this rank's tokens.
    """
    return torch.logsumexp(logits, dim=-1).square().sum() * (coeff / total_num_tokens)


def get_updated_expert_bias(tokens_per_expert: torch.Tensor, expert_bias: torch.Tensor,
                            update_rate: float) -> torch.Tensor:
    """``expert_bias + rate * sign(mean(tokens) - tokens)``: raise under-loaded experts."""
    load = tokens_per_expert.to(torch.float32)
    return expert_bias + update_rate * torch.sign(load.mean() - load)


def update_router_expert_bias(modules: Iterable[torch.nn.Module],
                              group: Optional[dist.ProcessGroup] = None) -> None:
    """Update the expert bias of every router in ``modules`` from the step's token counts.

    Call once per optimizer step on every rank of ``group`` (default: tp x cp x dp, all
    ranks of a pipeline stage). The counts are summed over ``group`` so every rank applies
    the same update; then they are reset.
    """
    if group is None:
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    routers = [m for module in modules for m in module.modules()
               if getattr(m, "expert_bias", None) is not None
               and hasattr(m, "local_tokens_per_expert")]
    if not routers:
        return
    # All routers' counts in one flat buffer: [num_routers * E], one all-reduce.
    counts = torch.cat([r.local_tokens_per_expert.to(torch.float64) for r in routers])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    for router, load in zip(routers, counts.split([r.expert_bias.numel() for r in routers])):
        with torch.no_grad():
            router.expert_bias.copy_(get_updated_expert_bias(
                load, router.expert_bias, router.config.moe_router_bias_update_rate))
            router.local_tokens_per_expert.zero_()
