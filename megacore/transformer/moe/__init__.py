"""Mixture of Experts: router, token dispatchers, experts and the MoE layer.

``MoELayer`` replaces the dense MLP of a transformer layer (same ``(output, bias)``
interface); ``get_moe_module_spec`` gives its spec and ``is_moe_layer`` says which layers
``moe_layer_freq`` makes MoE. Experts are split over the expert-parallel group and,
inside, over the expert-tensor-parallel group; their params carry ``allreduce=False``.
"""

from megacore.transformer.moe.experts import GroupedMLP, SequentialMLP, expert_init_key
from megacore.transformer.moe.load_balancing import (
    MoEAuxLossAutoScaler,
    get_updated_expert_bias,
    sequence_load_balancing_loss,
    set_moe_aux_loss_scale,
    switch_load_balancing_loss,
    update_router_expert_bias,
    z_loss,
)
from megacore.transformer.moe.moe_layer import (
    MoELayer,
    MoESubmodules,
    get_moe_submodules,
)
from megacore.transformer.moe.moe_metrics import (
    MoELayerMetrics,
    reduce_moe_metrics,
    reset_moe_metrics,
)
from megacore.transformer.moe.moe_module_specs import get_moe_module_spec
from megacore.transformer.moe.router import (
    RoutingResult,
    TopKRouter,
    group_limited_choice,
    topk_routing,
)
from megacore.transformer.moe.shared_experts import SharedExpertMLP
from megacore.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
    MoETokenDispatcher,
    build_token_dispatcher,
)
from megacore.transformer.moe.token_dropping import (
    drop_tokens_over_capacity,
    expert_capacity,
)
from megacore.transformer.moe_config import (
    MoEConfig,
    check_moe_parallelism,
    get_moe_layer_pattern,
    is_moe_layer,
)

__all__ = [
    "MoEConfig", "check_moe_parallelism", "get_moe_layer_pattern", "is_moe_layer",
    "MoELayer", "MoESubmodules", "get_moe_submodules", "get_moe_module_spec",
    "TopKRouter", "RoutingResult", "topk_routing", "group_limited_choice",
    "MoETokenDispatcher", "MoEAllGatherTokenDispatcher", "MoEAlltoAllTokenDispatcher",
    "build_token_dispatcher",
    "SequentialMLP", "GroupedMLP", "expert_init_key", "SharedExpertMLP",
    "MoEAuxLossAutoScaler", "set_moe_aux_loss_scale", "switch_load_balancing_loss",
    "sequence_load_balancing_loss",
    "z_loss", "get_updated_expert_bias", "update_router_expert_bias",
    "expert_capacity", "drop_tokens_over_capacity",
    "MoELayerMetrics", "reduce_moe_metrics", "reset_moe_metrics",
]
