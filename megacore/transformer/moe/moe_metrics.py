"""Load and loss metrics of MoE layers, for the training log.

Each ``MoELayer`` owns a :class:`MoELayerMetrics` and records into it on every forward:
tokens processed per expert (after dropping), assignments dropped, and this rank's shares of
the balancing loss and z-loss (without their coefficients). Nothing is communicated then.

At logging time the training loop calls :func:`reduce_moe_metrics` on its model chunks:
one all-reduce (sum) over the ranks of a pipeline stage that hold distinct tokens
(tp x cp x dp by default), then a dict such as::

    {"moe/load_balancing_loss": 1.03, "moe/z_loss": 2.1,
     "moe/tokens_per_expert_min": 51.0, "moe/tokens_per_expert_max": 77.0,
     "moe/dropped_tokens": 0.0, "moe/experts_without_tokens": 0.0,
     "moe/layer_2/load_balancing_loss": 1.03, ...}   # per layer with moe_per_layer_logging

Values are per micro-batch (a micro-batch's tokens may be split over tp x cp ranks), averaged
over the micro-batches recorded on all data-parallel replicas; ``experts_without_tokens``
counts experts that got no token at all since the last reset. The unprefixed keys average
(losses, token stats) or sum (dropped tokens, experts without tokens) over the layers. With pipeline
parallelism each stage reports its own layers. Call :func:`reset_moe_metrics` after
logging.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from megacore import parallel_state

__all__ = ["MoELayerMetrics", "reduce_moe_metrics", "reset_moe_metrics"]


class MoELayerMetrics:
    """Running sums for one MoE layer on this rank (since the last reset).

    Args:
        num_experts: experts of the layer.
        layer_number: 1-based global layer number (for the log keys), or None.
        token_domain_size: ranks that split one micro-batch's tokens (tp x cp): their loss
            shares add up to the micro-batch's loss.
    """

    def __init__(self, num_experts: int, layer_number: Optional[int], token_domain_size: int):
        self.num_experts = num_experts
        self.layer_number = layer_number
        self.token_domain_size = token_domain_size
        self.reset()

    def reset(self) -> None:
        # [E tokens per expert, dropped, balancing loss, z-loss, forward calls]
        self.sums = torch.zeros(self.num_experts + 4, dtype=torch.float64)

    def record(self, tokens_per_expert: torch.Tensor, num_dropped: torch.Tensor,
               load_balancing_loss: Optional[torch.Tensor],
               z_loss: Optional[torch.Tensor]) -> None:
        """Add one forward's numbers (all detached; this rank's tokens)."""
        with torch.no_grad():
            values = torch.zeros_like(self.sums)
            values[:self.num_experts] = tokens_per_expert.detach().to(torch.float64).cpu()
            values[-4] = float(num_dropped)
            values[-3] = 0.0 if load_balancing_loss is None else float(load_balancing_loss)
            values[-2] = 0.0 if z_loss is None else float(z_loss)
            values[-1] = 1.0
            self.sums += values

    def summarize(self, sums: torch.Tensor) -> Dict[str, float]:
        """Per-micro-batch metrics from ``sums`` all-reduced over the stage's ranks."""
        # token_domain_size ranks (tp x cp) share one micro-batch: their forward calls,
        # token counts and loss shares add up to that micro-batch's.
        micro_batches = sums[-1].item() / self.token_domain_size
        if micro_batches == 0:
            return {}
        tokens = sums[:self.num_experts] / micro_batches
        return {
            "load_balancing_loss": sums[-3].item() / micro_batches,
            "z_loss": sums[-2].item() / micro_batches,
            "tokens_per_expert_min": tokens.min().item(),
            "tokens_per_expert_max": tokens.max().item(),
            "dropped_tokens": sums[-4].item() / micro_batches,
            "experts_without_tokens": float((sums[:self.num_experts] == 0).sum().item()),
        }


def _layer_metrics(modules: Iterable[torch.nn.Module]) -> List[MoELayerMetrics]:
    found = [m.metrics for module in modules for m in module.modules()
             if isinstance(getattr(m, "metrics", None), MoELayerMetrics)]
    return sorted(found, key=lambda m: m.layer_number or 0)


def reduce_moe_metrics(modules: Iterable[torch.nn.Module],
                       group: Optional[dist.ProcessGroup] = None,
                       per_layer: bool = False) -> Dict[str, float]:
    """Sum every MoE layer's metrics over ``group`` and return the log dict.

    Collective: every rank of ``group`` (default tp x cp x dp) must call it.

    Args:
        modules: model chunks (any modules containing ``MoELayer``s).
        group: ranks to sum over.
        per_layer: also return ``moe/layer_<n>/...`` keys.
    """
    layers = _layer_metrics(list(modules))
    if not layers:
        return {}
    if group is None:
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    flat = torch.cat([m.sums for m in layers])  # [layers * (E + 4)], one all-reduce
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    per = [m.summarize(s) for m, s in zip(layers, flat.split([m.sums.numel() for m in layers]))]
    return _combine(layers, per, per_layer)


def _combine(layers, per, per_layer) -> Dict[str, float]:
    per = [(m, d) for m, d in zip(layers, per) if d]
    if not per:
        return {}
    out: Dict[str, float] = {}
    for key in per[0][1]:
        values = [d[key] for _, d in per]
        summed = key in ("dropped_tokens", "experts_without_tokens")
        out[f"moe/{key}"] = sum(values) if summed else sum(values) / len(values)
    if per_layer:
        for i, (m, d) in enumerate(per):
            name = m.layer_number if m.layer_number is not None else i
            out.update({f"moe/layer_{name}/{k}": v for k, v in d.items()})
    return out


def reset_moe_metrics(modules: Iterable[torch.nn.Module]) -> None:
    """Zero the running sums of every MoE layer in ``modules``."""
    for metrics in _layer_metrics(list(modules)):
        metrics.reset()
