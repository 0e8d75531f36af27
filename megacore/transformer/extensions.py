"""Optional accelerated kernels (NVIDIA Apex, Transformer Engine): the one guarded import.

Nothing else in megacore imports Apex or Transformer Engine. Their absence is never an
error: ``HAVE_APEX`` / ``HAVE_TE`` say what is there, and the spec helpers in
``megacore.models.gpt.gpt_layer_specs`` pick these modules only when they are importable
and the run is on CUDA. (The PyPI package named ``apex`` is an unrelated web toolkit; we
probe ``apex.normalization``, which only NVIDIA Apex has.)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megacore import device
from megacore import parallel_state as ps
from megacore.tensor_parallel.layers import _shard_master_weight
from megacore.tensor_parallel.random import get_rng_tracker
from megacore.transformer.enums import AttnMaskType
from megacore.transformer.transformer_config import TransformerConfig
from megacore.transformer.transformer_layer import TransformerLayer

try:  # the guarded imports
    from apex.normalization.fused_layer_norm import (
        FusedLayerNorm as _ApexFusedLayerNorm,
    )
    HAVE_APEX = True
except Exception:  # noqa: BLE001 - absent, or a broken build: either way unusable
    HAVE_APEX = False

try:
    import transformer_engine.pytorch as _te
    HAVE_TE = True
except Exception:  # noqa: BLE001
    HAVE_TE = False

__all__ = ["HAVE_APEX", "HAVE_TE", "apex_usable", "te_usable", "FusedLayerNorm", "TENorm",
           "TELayerNormColumnParallelLinear", "TERowParallelLinear", "TEDotProductAttention",
           "require_transformer_engine", "keep_local_checkpoint_names", "TETransformerLayer"]


def apex_usable() -> bool:
    """Apex's fused norm can run here (importable and on CUDA)."""
    return HAVE_APEX and device.device_type() == "cuda"


def te_usable() -> bool:
    """Transformer Engine modules can run here (importable and on CUDA)."""
    return HAVE_TE and device.device_type() == "cuda"


class FusedLayerNorm(torch.nn.Module):
    """Apex's fused LayerNorm; weights carry ``sequence_parallel`` like the torch norm.

    Raises:
        RuntimeError: Apex is not importable or the run is not on CUDA.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if not apex_usable():
            raise RuntimeError("FusedLayerNorm needs NVIDIA Apex on CUDA; use "
                               "megacore.transformer.torch_norm.LayerNorm instead")
        self.norm = _ApexFusedLayerNorm(hidden_size, eps=eps)
        for param in self.norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        # Zero-centered gamma (stored weight = gamma - 1): Apex's module has no such
        # mode, so those runs take torch's kernel with weight + 1.
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        if self.zero_centered_gamma:
            with torch.no_grad():
                self.norm.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_centered_gamma:
            return torch.nn.functional.layer_norm(x, self.norm.normalized_shape,
                                                  self.norm.weight + 1, self.norm.bias,
                                                  self.norm.eps)
        return self.norm(x)


class TENorm:
    """Transformer Engine's LayerNorm or RMSNorm (by ``config.normalization``).

    Raises:
        RuntimeError: Transformer Engine is not importable or the run is not on CUDA.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        if not te_usable():
            raise RuntimeError("TENorm needs Transformer Engine on CUDA; use "
                               "megacore.transformer.torch_norm.WrappedTorchNorm instead")
        norm_cls = _te.RMSNorm if config.normalization == "RMSNorm" else _te.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, sequence_parallel=config.sequence_parallel,
                        params_dtype=config.params_dtype,
                        zero_centered_gamma=config.layernorm_zero_centered_gamma)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


# --------------------------------------------------------------------------------------
# --transformer-impl transformer_engine: TE linears and attention behind megacore's API
# --------------------------------------------------------------------------------------
def require_transformer_engine(what: str = "--transformer-impl transformer_engine") -> None:
    """Raise naming ``what`` unless Transformer Engine is importable and the run is on
    CUDA."""
    if te_usable():
        return
    reason = "Transformer Engine is not importable" if not HAVE_TE else \
        f"this run is on {device.device_type()}, not CUDA"
    raise RuntimeError(f"{what} needs Transformer Engine on CUDA ({reason}); use "
                       f"--transformer-impl local")


def _tp(tp_group):
    group = tp_group if tp_group is not None else ps.get_tensor_model_parallel_group()
    return group, torch.distributed.get_world_size(group), torch.distributed.get_rank(group)


def _load_master(weight: torch.Tensor, full_shape, dim: int, stride: int, init_method,
                 rank: int, world: int) -> None:
    """megacore's layout-independent init: draw the full master on the CPU, keep the
    shard (TE's own init draws per rank)."""
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    with torch.no_grad():
        weight.copy_(_shard_master_weight(master, dim, stride, rank, world))


class TELayerNormColumnParallelLinear(torch.nn.Module):
    """Norm fused with a column-parallel linear (TE ``LayerNormLinear``): the input norm
    of attention (``linear_qkv``) or of the MLP (``linear_fc1``).

    Same constructor and return value as
    :class:`~megacore.tensor_parallel.ColumnParallelLinear` (``(output, bias or None)``);
    the norm follows ``config.normalization``. Weights come from megacore's master-weight
    init, so they equal the local implementation's for the same seed and layout.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 init_method: Callable, bias: bool = True, gather_output: bool = False,
                 stride: int = 1, skip_bias_add: bool = False, is_expert: bool = False,
                 tp_group=None, **unused):
        super().__init__()
        require_transformer_engine()
        if gather_output or is_expert:
            raise ValueError("TELayerNormColumnParallelLinear supports gather_output=False "
                             "and dense layers only")
        group, world, rank = _tp(tp_group)
        self.skip_bias_add = skip_bias_add
        self.te = _te.LayerNormLinear(
            input_size, output_size, eps=config.layernorm_epsilon,
            sequence_parallel=config.sequence_parallel and world > 1,
            fuse_wgrad_accumulation=config.gradient_accumulation_fusion, tp_group=group,
            tp_size=world, get_rng_state_tracker=get_rng_tracker, bias=bias,
            normalization=config.normalization, return_bias=skip_bias_add,
            params_dtype=config.params_dtype, parallel_mode="column",
            device=device.current_device())
        if config.perform_initialization:
            _load_master(self.te.weight, (output_size, input_size), 0, stride, init_method,
                         rank, world)
            self.te.weight.partition_stride = stride

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None):
        if weight is not None:
            raise ValueError("--transformer-impl transformer_engine does not support "
                             "replicated key/value heads (num_query_groups < tp)")
        out = self.te(x)  # [s, b, out/tp] (sequence parallel: gathered inside)
        return out if self.skip_bias_add else (out, None)


class TERowParallelLinear(torch.nn.Module):
    """Row-parallel linear from TE ``Linear`` (``linear_proj``, ``linear_fc2``); same
    constructor and return value as :class:`~megacore.tensor_parallel.RowParallelLinear`."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 init_method: Callable, bias: bool, input_is_parallel: bool = True,
                 skip_bias_add: bool = False, stride: int = 1, is_expert: bool = False,
                 tp_group=None, **unused):
        super().__init__()
        require_transformer_engine()
        if not input_is_parallel or is_expert:
            raise ValueError("TERowParallelLinear supports input_is_parallel=True and dense "
                             "layers only")
        group, world, rank = _tp(tp_group)
        self.skip_bias_add = skip_bias_add
        self.te = _te.Linear(
            input_size, output_size,
            sequence_parallel=config.sequence_parallel and world > 1,
            fuse_wgrad_accumulation=config.gradient_accumulation_fusion, tp_group=group,
            tp_size=world, get_rng_state_tracker=get_rng_tracker, bias=bias,
            return_bias=skip_bias_add, params_dtype=config.params_dtype,
            parallel_mode="row", device=device.current_device())
        if config.perform_initialization:
            _load_master(self.te.weight, (output_size, input_size), 1, stride, init_method,
                         rank, world)

    def forward(self, x: torch.Tensor):
        out = self.te(x)  # [s, b, h] (sequence parallel: [s/tp, b, h], reduce-scattered)
        return out if self.skip_bias_add else (out, None)


class TEDotProductAttention(torch.nn.Module):
    """TE's fused attention (FlashAttention / cuDNN) with megacore's core-attention
    contract: query ``[sq, b, np/tp, hn]``, key/value ``[sk, b, ng/tp, hn]``, output
    ``[sq, b, np/tp * hn]``. Dropout masks come from TE's kernels (per tp rank, drawn
    under the tracker's model-parallel stream), so layouts agree statistically."""

    _MASKS = {AttnMaskType.causal: "causal", AttnMaskType.no_mask: "no_mask",
              AttnMaskType.padding: "padding", AttnMaskType.padding_causal: "padding_causal"}

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, pg_collection=None):
        super().__init__()
        require_transformer_engine()
        cp_group = pg_collection.cp if pg_collection is not None else (
            ps.get_context_parallel_group())
        if torch.distributed.get_world_size(cp_group) > 1:
            raise ValueError("--transformer-impl transformer_engine with "
                             "--context-parallel-size > 1 is not supported; use "
                             "--transformer-impl local (megacore's ring attention)")
        if config.layout_independent_attention_dropout:
            raise ValueError("--layout-independent-attention-dropout needs "
                             "--transformer-impl local")
        group, world, _ = _tp(pg_collection.tp if pg_collection is not None else None)
        self.attn_mask_type = attn_mask_type
        self.te = _te.DotProductAttention(
            config.num_attention_heads, config.kv_channels,
            num_gqa_groups=config.num_query_groups,
            attention_dropout=config.attention_dropout if attention_dropout is None
            else attention_dropout,
            qkv_format="sbhd", attn_mask_type=self._MASKS[attn_mask_type],
            sequence_parallel=config.sequence_parallel, tp_size=world, tp_group=group,
            get_rng_state_tracker=get_rng_tracker, layer_number=layer_number,
            attention_type=attention_type,
            softmax_scale=softmax_scale if softmax_scale is not None else config.softmax_scale)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None):
        mask_type = self._MASKS[attn_mask_type or self.attn_mask_type]
        if mask_type == "causal" and query.size(0) != key.size(0):
            mask_type = "causal_bottom_right"  # decoding with a KV cache
        return self.te(query, key, value, attention_mask=attention_mask,
                       attn_mask_type=mask_type)


# Checkpoint names: TE fuses the layer's norms into the next linear. Saved state uses the
# local implementation's names, so either implementation loads the other's checkpoints.
_TE_NORM_NAMES = {"self_attention.linear_qkv.te.layer_norm_": "input_layernorm.",
                  "mlp.linear_fc1.te.layer_norm_": "pre_mlp_layernorm."}
_TE_PREFIXES = {"self_attention.linear_qkv.te.": "self_attention.linear_qkv.",
                "self_attention.linear_proj.te.": "self_attention.linear_proj.",
                "mlp.linear_fc1.te.": "mlp.linear_fc1.", "mlp.linear_fc2.te.": "mlp.linear_fc2."}


def _to_local_name(name: str) -> Optional[str]:
    """A TE module's state-dict name -> the local spec's (None: not saved)."""
    if name.endswith("._extra_state"):
        return None
    for te_prefix, local in {**_TE_NORM_NAMES, **_TE_PREFIXES}.items():
        if name.startswith(te_prefix):
            return local + name[len(te_prefix):]
    return name


def keep_local_checkpoint_names(layer: torch.nn.Module) -> None:
    """Make ``layer``'s state dict use the local implementation's names (and drop TE's
    ``_extra_state``, which holds FP8 metadata megacore does not use); loading maps them
    back. Example: ``self_attention.linear_qkv.te.layer_norm_weight`` is saved as
    ``input_layernorm.weight``."""
    te_names = list(layer.state_dict().keys())
    local_to_te = {_to_local_name(n): n for n in te_names if _to_local_name(n) is not None}
    extra = [n for n in te_names if _to_local_name(n) is None]

    def save_hook(module, state_dict, prefix, local_metadata):
        for name in te_names:
            value = state_dict.pop(prefix + name, None)
            local = _to_local_name(name)
            if local is not None and value is not None:
                state_dict[prefix + local] = value

    def load_hook(state_dict, prefix, *args):
        for local, name in local_to_te.items():
            if prefix + local in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + local)
        for name in extra:
            state_dict.setdefault(prefix + name, None)

    layer._register_state_dict_hook(save_hook)
    layer._register_load_state_dict_pre_hook(load_hook)


class TETransformerLayer(TransformerLayer):
    """A :class:`TransformerLayer` built from TE modules whose checkpoint names are the
    local implementation's (see :func:`keep_local_checkpoint_names`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        keep_local_checkpoint_names(self)
