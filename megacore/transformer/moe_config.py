"""``MoEConfig``: the Mixture-of-Experts fields of a transformer config.

Field names are Megatron-Core's (``num_moe_experts``, ``moe_router_topk`` ...), so configs and
flags port unchanged (``--num-experts`` -> ``num_moe_experts``). ``TransformerConfig`` inherits
these fields; until it does, code combines the two in one dataclass::

    @dataclasses.dataclass
    class Config(MoEConfig, TransformerConfig):  # MoEConfig first: its __post_init__ chains
        pass

``MoEConfig.__post_init__`` first runs the next ``__post_init__`` in the MRO (when there is
one), then checks its own fields. Checks that involve the parallel degrees
(``num_moe_experts`` divisible by ``expert_model_parallel_size`` ...) are in
:func:`check_moe_parallelism`, called by ``MoELayer``.

:func:`get_moe_layer_pattern` / :func:`is_moe_layer` interpret ``moe_layer_freq`` for
layer specs: which global layers use an MoE layer in place of the dense MLP.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Union

from megacore.config_error import FieldError

__all__ = ["MoEConfig", "check_moe_parallelism", "get_moe_layer_pattern", "is_moe_layer"]

ROUTER_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
TOKEN_DISPATCHER_TYPES = ("allgather", "alltoall")
TOKEN_DROP_POLICIES = ("probs", "position")


@dataclasses.dataclass
class MoEConfig:
    """Mixture-of-Experts layer settings (all inert while ``num_moe_experts`` is None)."""

    # -- experts ------------------------------------------------------------------------
    num_moe_experts: Optional[int] = None
    """Routed experts per MoE layer (None: no MoE, every layer has a dense MLP). Must be
    divisible by expert_model_parallel_size: each ep rank holds ``num_moe_experts / ep``."""

    moe_ffn_hidden_size: Optional[int] = None
    """Inner width of each routed expert's MLP (None: ``ffn_hidden_size``). Fine-grained
    MoE uses many experts with a small width."""

    moe_grouped_gemm: bool = False
    """Run the local experts as one batched matmul per linear (``GroupedMLP``) instead of one
    ``MLP`` per expert in a loop (``SequentialMLP``). Same weights and math."""

    moe_shared_expert_intermediate_size: Optional[int] = None
    """Inner width of the shared expert, a dense MLP every token goes through next to the
    routed experts (DeepSeek, Qwen-MoE). None: no shared expert."""

    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by ``sigmoid(x w_gate)`` per token (Qwen2-MoE)."""

    moe_layer_freq: Union[int, List[int]] = 1
    """Which layers are MoE: an int N makes every N-th layer MoE (layers 1, N+1, 2N+1 ...
    counting from 1, i.e. 0-based index % N == 0); a list of 0/1 of length num_layers gives
    the pattern explicitly, e.g. ``[1, 0, 1, 0]``."""

    # -- router -------------------------------------------------------------------------
    moe_router_topk: int = 2
    """Experts each token is sent to."""

    moe_router_score_function: str = "softmax"
    """``"softmax"`` over the logits, or ``"sigmoid"`` per expert (DeepSeek-V3; the chosen
    scores are renormalized to sum to 1 when topk > 1)."""

    moe_router_pre_softmax: bool = False
    """With softmax scores: apply the softmax over all experts before picking the top k
    (the chosen probabilities then sum to < 1), instead of a softmax over the k chosen
    logits (they sum to 1, Mixtral)."""

    moe_router_num_groups: Optional[int] = None
    """Group-limited routing (DeepSeek-V3's node-limited routing): split the experts into
    this many equal groups (e.g. one per node) and route each token only within its
    ``moe_router_group_topk`` best groups, a group scoring the sum of its best
    ``moe_router_topk // moe_router_group_topk`` scores (expert bias included). None: off."""

    moe_router_group_topk: Optional[int] = None
    """Groups each token may use under group-limited routing (DeepSeek-V3: 4 of 8)."""

    moe_router_topk_scaling_factor: Optional[float] = None
    """Multiply the routing probabilities by this factor (DeepSeek-V2/V3). None: 1."""

    moe_router_load_balancing_type: str = "aux_loss"
    """``"aux_loss"``: Switch/GShard loss over the micro-batch; ``"seq_aux_loss"``: the same
    loss per sequence, averaged over the batch (DeepSeek-V2); ``"none"``: no balancing loss
    (use expert bias or nothing)."""

    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss. 0 disables it (1e-2 is a common value)."""

    moe_z_loss_coeff: Optional[float] = None
    """Weight of the router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE), which keeps
    logits small. None: off (1e-3 is a common value)."""

    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the scores only
    to choose the experts, is nudged after every step towards equal load (see
    ``load_balancing.update_router_expert_bias``)."""

    moe_router_bias_update_rate: float = 1e-3
    """Step of the expert-bias update: ``bias += rate * sign(mean_load - load)``."""

    # -- dispatch and capacity ----------------------------------------------------------
    moe_token_dispatcher_type: str = "allgather"
    """How tokens reach experts on other ep ranks: ``"allgather"`` (every rank sees all
    tokens of the expert group and keeps its own; simple, best for small ep) or
    ``"alltoall"`` (each token goes only to the rank of its expert; best for large ep)."""

    moe_expert_capacity_factor: Optional[float] = None
    """Drop tokens beyond ``capacity = ceil(tokens * topk / num_experts * factor)`` per
    expert, counted over this rank's tokens. None: dropless (every token is processed)."""

    moe_pad_expert_input_to_capacity: bool = False
    """Pad every expert's input from every rank to exactly ``capacity`` rows, so the
    all-to-all sizes are static and need no count exchange (needs moe_expert_capacity_factor;
    every rank must route the same number of tokens). Only the ``"alltoall"`` dispatcher
    pads: the ``"allgather"`` one moves fixed-size buffers anyway."""

    moe_token_drop_policy: str = "probs"
    """Which tokens an over-full expert drops: ``"probs"`` keeps the ``capacity`` tokens
    with the highest routing probability; ``"position"`` keeps the first ``capacity``
    tokens in sequence order."""

    # -- logging ------------------------------------------------------------------------
    moe_per_layer_logging: bool = False
    """Report load and loss metrics per MoE layer, not only their mean over layers."""

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self._check_moe_experts()
        self._check_moe_router()
        self._check_moe_capacity()

    # -- phases of __post_init__ ------------------------------------------------------
    def _check_moe_experts(self) -> None:
        if self.num_moe_experts is not None and (not isinstance(self.num_moe_experts, int)
                                                 or self.num_moe_experts < 1):
            raise FieldError(f"num_moe_experts must be None or a positive integer, "
                             f"got {self.num_moe_experts!r}", "num_moe_experts")
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise FieldError(f"{name} must be None or a positive integer, got {value!r}",
                                 name)
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            if freq < 1:
                raise FieldError(f"moe_layer_freq must be >= 1, got {freq}", "moe_layer_freq")
        elif not (isinstance(freq, (list, tuple)) and all(v in (0, 1) for v in freq)):
            raise FieldError(f"moe_layer_freq must be an int or a list of 0/1, got {freq!r}",
                             "moe_layer_freq")

    def _check_group_limited_routing(self) -> None:
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if groups is None and group_topk is None:
            return
        if groups is None or group_topk is None:
            raise FieldError("moe_router_num_groups and moe_router_group_topk go together "
                             "(--moe-router-num-groups, --moe-router-group-topk)",
                             "moe_router_num_groups", "moe_router_group_topk")
        experts = self.num_moe_experts or 0
        if groups < 1 or experts % groups:
            raise FieldError(f"moe_router_num_groups {groups} must divide num_moe_experts "
                             f"{experts}", "moe_router_num_groups", "num_moe_experts")
        if not 1 <= group_topk <= groups:
            raise FieldError(f"moe_router_group_topk must be in [1, moe_router_num_groups="
                             f"{groups}], got {group_topk}",
                             "moe_router_group_topk", "moe_router_num_groups")
        per_group = self.moe_router_topk // group_topk
        if self.moe_router_topk % group_topk or per_group > experts // groups:
            raise FieldError(f"moe_router_topk {self.moe_router_topk} must be a multiple of "
                             f"moe_router_group_topk {group_topk}, at most "
                             f"{experts // groups} per group",
                             "moe_router_topk", "moe_router_group_topk")

    def _check_moe_router(self) -> None:
        if self.moe_router_load_balancing_type not in ROUTER_LOAD_BALANCING_TYPES:
            raise FieldError(f"moe_router_load_balancing_type must be one of "
                             f"{ROUTER_LOAD_BALANCING_TYPES}, got "
                             f"{self.moe_router_load_balancing_type!r}",
                             "moe_router_load_balancing_type")
        if self.moe_router_score_function not in ROUTER_SCORE_FUNCTIONS:
            raise FieldError(f"moe_router_score_function must be one of "
                             f"{ROUTER_SCORE_FUNCTIONS}, got {self.moe_router_score_function!r}",
                             "moe_router_score_function")
        if self.moe_router_pre_softmax and self.moe_router_score_function != "softmax":
            raise FieldError("moe_router_pre_softmax applies only to "
                             "moe_router_score_function='softmax'",
                             "moe_router_pre_softmax", "moe_router_score_function")
        if self.num_moe_experts is not None and not 1 <= self.moe_router_topk <= \
                self.num_moe_experts:
            raise FieldError(f"moe_router_topk must be in [1, num_moe_experts="
                             f"{self.num_moe_experts}], got {self.moe_router_topk}",
                             "moe_router_topk", "num_moe_experts")
        self._check_group_limited_routing()
        if self.moe_aux_loss_coeff < 0:
            raise FieldError(f"moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}",
                             "moe_aux_loss_coeff")
        if self.moe_z_loss_coeff is not None and self.moe_z_loss_coeff < 0:
            raise FieldError(f"moe_z_loss_coeff must be None or >= 0, "
                             f"got {self.moe_z_loss_coeff}", "moe_z_loss_coeff")
        if self.moe_router_bias_update_rate < 0:
            raise FieldError(f"moe_router_bias_update_rate must be >= 0, "
                             f"got {self.moe_router_bias_update_rate}",
                             "moe_router_bias_update_rate")

    def _check_moe_capacity(self) -> None:
        if self.moe_token_dispatcher_type not in TOKEN_DISPATCHER_TYPES:
            raise FieldError(f"moe_token_dispatcher_type must be one of "
                             f"{TOKEN_DISPATCHER_TYPES}, got {self.moe_token_dispatcher_type!r}",
                             "moe_token_dispatcher_type")
        if self.moe_token_drop_policy not in TOKEN_DROP_POLICIES:
            raise FieldError(f"moe_token_drop_policy must be one of {TOKEN_DROP_POLICIES}, "
                             f"got {self.moe_token_drop_policy!r}", "moe_token_drop_policy")
        factor = self.moe_expert_capacity_factor
        if factor is not None and factor <= 0:
            raise FieldError(f"moe_expert_capacity_factor must be None or > 0, got {factor}",
                             "moe_expert_capacity_factor")
        if self.moe_pad_expert_input_to_capacity and factor is None:
            raise FieldError("moe_pad_expert_input_to_capacity needs "
                             "moe_expert_capacity_factor to be set",
                             "moe_pad_expert_input_to_capacity", "moe_expert_capacity_factor")


def check_moe_parallelism(config) -> None:
    """Checks across the MoE fields and the parallel degrees of one config.

    Raises ``ValueError`` naming the fields when the experts cannot be split as asked.
    """
    experts, ep = config.num_moe_experts, config.expert_model_parallel_size
    if experts is None:
        raise FieldError("an MoE layer needs num_moe_experts to be set", "num_moe_experts")
    if experts % ep:
        raise FieldError(f"num_moe_experts ({experts}) must be divisible by "
                         f"expert_model_parallel_size ({ep})",
                         "num_moe_experts", "expert_model_parallel_size")
    etp = config.expert_tensor_parallel_size
    ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
    if ffn % etp:
        raise FieldError(f"moe_ffn_hidden_size ({ffn}) must be divisible by "
                         f"expert_tensor_parallel_size ({etp})",
                         "moe_ffn_hidden_size", "expert_tensor_parallel_size")
    shared = config.moe_shared_expert_intermediate_size
    if shared is not None and shared % config.tensor_model_parallel_size:
        raise FieldError(f"moe_shared_expert_intermediate_size ({shared}) must be divisible "
                         f"by tensor_model_parallel_size ({config.tensor_model_parallel_size})",
                         "moe_shared_expert_intermediate_size", "tensor_model_parallel_size")


def get_moe_layer_pattern(moe_layer_freq: Union[int, List[int]], num_layers: int) -> List[bool]:
    """``moe_layer_freq`` as one bool per layer (index 0 is layer 1).

    Examples: ``(2, 4) -> [True, False, True, False]``; ``([0, 1, 1], 3) ->
    [False, True, True]``.
    """
    if isinstance(moe_layer_freq, int):
        return [i % moe_layer_freq == 0 for i in range(num_layers)]
    if len(moe_layer_freq) != num_layers:
        raise FieldError(f"moe_layer_freq lists {len(moe_layer_freq)} layers but "
                         f"num_layers is {num_layers}", "moe_layer_freq", "num_layers")
    return [bool(v) for v in moe_layer_freq]


def is_moe_layer(config, layer_number: int) -> bool:
    """Whether 1-based global ``layer_number`` is an MoE layer under ``config``."""
    if config.num_moe_experts is None:
        return False
    return get_moe_layer_pattern(config.moe_layer_freq, config.num_layers)[layer_number - 1]
