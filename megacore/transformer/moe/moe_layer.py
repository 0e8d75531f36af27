"""``MoELayer``: a Mixture-of-Experts block that drops into a transformer layer in place of
the dense MLP (same ``forward(hidden_states) -> (output, bias)`` interface).

Data flow for this rank's tokens::

    x [s, b, h]  (or [s/tp, b, h] under sequence parallelism)
      | tp > 1 without sequence parallelism: keep own sequence slice -> [s/tp, b, h]
      |   (every rank must hold distinct tokens for the dispatch; the slice is gathered back
      |    at the end, so the layer's output is replicated over tp like a dense MLP's)
    router:      [s', b, h] -> probs, routing_map [T, E]       (T = s' * b)
    dispatcher:  [T, h] -> rows grouped by local expert [N, h]  (over ep and expert-tp)
    experts:     [N, h] -> [N, h]
    dispatcher:  [N, h] -> weighted sum per token [T, h]
      | tp > 1 without sequence parallelism: all-gather the sequence -> [s, b, h]
    + shared experts(x)                                         (when configured)

Gradients: router weight (and shared-expert gate) grads are partial over tp when tp > 1
(``sequence_parallel=True``: ``finalize_model_grads`` sums them over tp); expert params
(``allreduce=False``) are reduced over the expert-data-parallel group by DDP; all other
params over data parallelism as usual.

Shapes: ``s`` sequence, ``b`` micro-batch, ``h`` hidden, ``E`` experts, ``T`` tokens on this
rank, ``N`` routed rows on this rank.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.distributed as dist

from megacore.parallel_state import ProcessGroupCollection
from megacore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megacore.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megacore.transformer.initialization import init_rng_scope
from megacore.transformer.mlp import MLPSubmodules
from megacore.transformer.module import MegatronModule
from megacore.transformer.moe.experts import GroupedMLP, SequentialMLP
from megacore.transformer.moe.moe_metrics import MoELayerMetrics
from megacore.transformer.moe.router import TopKRouter
from megacore.transformer.moe.shared_experts import SharedExpertMLP
from megacore.transformer.moe.token_dispatcher import build_token_dispatcher
from megacore.transformer.moe_config import check_moe_parallelism
from megacore.transformer.spec_utils import ModuleSpec, build_module

__all__ = ["MoELayer", "MoESubmodules", "get_moe_submodules"]


@dataclasses.dataclass
class MoESubmodules:
    """Parts of :class:`MoELayer`: the routed experts and the (optional) shared expert."""

    experts: Union[ModuleSpec, type] = None
    shared_experts: Union[ModuleSpec, type] = None


def get_moe_submodules(moe_grouped_gemm: bool = False) -> MoESubmodules:
    """Local (torch) layers: ``GroupedMLP`` experts, or ``SequentialMLP`` experts of
    column/row-parallel linears; a shared-expert MLP (built only when
    ``moe_shared_expert_intermediate_size`` is set)."""
    linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    experts = ModuleSpec(module=GroupedMLP) if moe_grouped_gemm \
        else ModuleSpec(module=SequentialMLP, submodules=linears)
    return MoESubmodules(experts=experts,
                         shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=linears))


class MoELayer(MegatronModule):
    """Router, token dispatcher, routed experts and optional shared expert.

    Args:
        config: transformer config with the MoE fields (``MoEConfig``).
        submodules: experts and shared-expert specs (default: :func:`get_moe_submodules`
            with ``config.moe_grouped_gemm``).
        layer_number: 1-based global layer number (names the metrics), or None.
        pg_collection: process groups (default: ``parallel_state``'s grid).

    forward(hidden_states ``[s, b, h]``, or ``[s/tp, b, h]`` under sequence parallelism)
    returns ``(output of the same shape, None)``.
    """

    def __init__(self, config, submodules: Optional[MoESubmodules] = None,
                 layer_number: Optional[int] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        check_moe_parallelism(config)
        submodules = submodules or get_moe_submodules(config.moe_grouped_gemm)
        pgs = self.pg_collection
        self.layer_number = layer_number
        self.num_local_experts = config.num_moe_experts // dist.get_world_size(pgs.ep)
        # tp ranks hold the same tokens unless sequence parallel: split them for dispatch.
        self.split_tokens_over_tp = self.tp_size > 1 and not config.sequence_parallel
        with init_rng_scope("router"):
            self.router = TopKRouter(config, pg_collection=pgs)
        self.experts = build_module(submodules.experts, self.num_local_experts, config,
                                    pg_collection=pgs)
        self.token_dispatcher = build_token_dispatcher(self.num_local_experts, config, pgs)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size is not None:
            with init_rng_scope("shared_experts"):
                self.shared_experts = build_module(submodules.shared_experts, config,
                                                   pg_collection=pgs)
        self.metrics = MoELayerMetrics(config.num_moe_experts, layer_number,
                                       dist.get_world_size(pgs.tp_cp))

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states
        if self.split_tokens_over_tp:
            if x.size(0) % self.tp_size:
                raise ValueError(f"MoE with tensor_model_parallel_size={self.tp_size} and no "
                                 f"sequence_parallel needs the sequence length ({x.size(0)}) "
                                 f"divisible by it")
            x = scatter_to_sequence_parallel_region(x, self.tp_group)  # [s, b, h] -> [s/tp, b, h]
        routing = self.router(x)
        tokens = x.reshape(-1, x.size(-1))  # [s', b, h] -> [T, h]
        expert_input, tokens_per_expert = self.token_dispatcher.token_permutation(
            tokens, routing.probs, routing.routing_map)
        expert_output, _ = self.experts(expert_input, tokens_per_expert)
        output = self.token_dispatcher.token_unpermutation(expert_output).view(x.shape)
        if self.split_tokens_over_tp:
            # [s/tp, b, h] -> [s, b, h]; bwd: keep own slice (the grad is replicated over tp)
            output = gather_from_sequence_parallel_region(output, False, self.tp_group)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        self.metrics.record(routing.routing_map.sum(dim=0), routing.num_dropped,
                            routing.load_balancing_loss, routing.z_loss)
        return output, None
