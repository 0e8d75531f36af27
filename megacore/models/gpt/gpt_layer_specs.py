"""Module specs for GPT-style decoder layers.

``get_gpt_layer_local_spec``: megacore's own tensor-parallel linears, torch core
attention, and torch norms (Apex's fused LayerNorm instead when it is importable on
CUDA). ``get_llama_layer_local_spec`` is the same with RMSNorm; pair it with
:func:`llama_config_kwargs` (SwiGLU, no biases, no dropout) and
``position_embedding_type="rope"``. ``get_gpt_layer_with_transformer_engine_spec`` swaps
the norms for Transformer Engine's.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

from megacore.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megacore.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megacore.transformer.dot_product_attention import DotProductAttention
from megacore.transformer.enums import AttnMaskType
from megacore.transformer.extensions import (
    HAVE_TE,
    FusedLayerNorm,
    TEDotProductAttention,
    TELayerNormColumnParallelLinear,
    TENorm,
    TERowParallelLinear,
    TETransformerLayer,
    apex_usable,
    require_transformer_engine,
)
from megacore.transformer.mlp import MLP, MLPSubmodules
from megacore.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
    ReplicatedLinear,
)
from megacore.transformer.moe.moe_module_specs import get_moe_module_spec
from megacore.transformer.moe_config import is_moe_layer
from megacore.transformer.spec_utils import IdentityOp, ModuleSpec
from megacore.transformer.torch_norm import LayerNorm, RMSNorm
from megacore.transformer.transformer_block import TransformerBlockSubmodules
from megacore.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

__all__ = ["get_gpt_layer_local_spec", "get_gpt_decoder_block_spec", "get_llama_layer_local_spec",
           "get_gpt_layer_with_transformer_engine_spec",
           "get_gpt_layer_with_transformer_engine_full_spec", "llama_config_kwargs"]


def _local_norm(normalization: str):
    if normalization == "RMSNorm":
        return RMSNorm
    if normalization == "LayerNorm":
        return FusedLayerNorm if apex_usable() else LayerNorm
    raise ValueError(f"normalization must be 'LayerNorm' or 'RMSNorm', got {normalization!r}")


def _mla_attention_spec(norm) -> ModuleSpec:
    """Multi-latent attention (``config.multi_latent_attention``): replicated
    down-projections, latent norms of the model's kind, column-parallel up-projections."""
    return ModuleSpec(
        module=MLASelfAttention, params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear, linear_q_down_proj=ReplicatedLinear,
            linear_q_up_proj=ColumnParallelLinear, linear_kv_down_proj=ReplicatedLinear,
            linear_kv_up_proj=ColumnParallelLinear, core_attention=DotProductAttention,
            linear_proj=RowParallelLinear, q_layernorm=norm, kv_layernorm=norm))


def _layer_spec(norm, qk_layernorm: bool, num_experts: Optional[int] = None,
                moe_grouped_gemm: bool = False, mla: bool = False) -> ModuleSpec:
    attention = _mla_attention_spec(norm) if mla else ModuleSpec(
        module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
            linear_proj=RowParallelLinear, q_layernorm=norm if qk_layernorm else None,
            k_layernorm=norm if qk_layernorm else None))
    if num_experts is not None:
        mlp = get_moe_module_spec(moe_grouped_gemm)
    else:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=attention, pre_mlp_layernorm=norm, mlp=mlp))


def get_gpt_layer_local_spec(num_experts: Optional[int] = None, moe_grouped_gemm: bool = False,
                             qk_layernorm: bool = False,
                             normalization: str = "LayerNorm") -> ModuleSpec:
    """Pre-norm GPT layer built from megacore's local modules.

    Args:
        num_experts: not None: every layer's MLP is an MoE layer (the expert count
            itself comes from the config's ``num_moe_experts``; for MoE on some layers
            only, pass a ``TransformerBlockSubmodules`` with per-layer specs).
        moe_grouped_gemm: grouped-GEMM experts (MoE only).
        qk_layernorm: normalize queries and keys per head (norm of kind ``normalization``).
        normalization: ``"LayerNorm"`` or ``"RMSNorm"``; should match
            ``TransformerConfig.normalization``.
    """
    return _layer_spec(_local_norm(normalization), qk_layernorm, num_experts, moe_grouped_gemm)


def get_gpt_decoder_block_spec(config, qk_layernorm: Optional[bool] = None
                               ) -> TransformerBlockSubmodules:
    """Per-layer specs for the whole decoder: MoE layers where ``config.moe_layer_freq``
    says (every layer, every N-th, or an explicit 0/1 pattern), dense MLPs elsewhere.

    Without experts (``config.num_moe_experts`` None) every layer gets the dense spec.
    """
    qk = config.qk_layernorm if qk_layernorm is None else qk_layernorm
    if config.transformer_impl == "transformer_engine":
        if config.num_moe_experts:
            raise ValueError("--transformer-impl transformer_engine builds dense layers only; "
                             "use --transformer-impl local with --num-experts")
        spec = get_gpt_layer_with_transformer_engine_full_spec(qk)
        return TransformerBlockSubmodules(layer_specs=[spec] * config.num_layers,
                                          layer_norm=TENorm)
    norm = _local_norm(config.normalization)
    mla = config.multi_latent_attention
    dense = _layer_spec(norm, qk, mla=mla)
    if not config.num_moe_experts:
        return TransformerBlockSubmodules(layer_specs=[dense] * config.num_layers,
                                          layer_norm=norm)
    moe = _layer_spec(norm, qk, config.num_moe_experts, config.moe_grouped_gemm, mla=mla)
    specs = [moe if is_moe_layer(config, number) else dense
             for number in range(1, config.num_layers + 1)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm)


def get_llama_layer_local_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """Llama-style layer: RMSNorm (use with :func:`llama_config_kwargs` and RoPE)."""
    return get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")


def llama_config_kwargs(num_query_groups: Optional[int] = None) -> dict:
    """``TransformerConfig`` fields that make a Llama-style model: RMSNorm, SwiGLU MLP,
    no biases, no dropout, grouped-query attention with ``num_query_groups``."""
    return dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0,
                attention_dropout=0.0, num_query_groups=num_query_groups,
                layernorm_epsilon=1e-5)


def get_gpt_layer_with_transformer_engine_spec(qk_layernorm: bool = False,
                                               normalization: str = "LayerNorm") -> ModuleSpec:
    """GPT layer with Transformer Engine norms (linears and attention stay local).

    Raises:
        ImportError: Transformer Engine is not installed.
    """
    if not HAVE_TE:
        raise ImportError("transformer_engine is not installed: use "
                          "get_gpt_layer_local_spec() instead")
    del normalization  # TENorm follows TransformerConfig.normalization
    return _layer_spec(TENorm, qk_layernorm)


def get_gpt_layer_with_transformer_engine_full_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """GPT layer for ``--transformer-impl transformer_engine``: TE ``LayerNormLinear``
    (the input norms fused into ``linear_qkv`` and ``linear_fc1``), TE ``Linear`` for the
    row-parallel projections and TE ``DotProductAttention``; checkpoint names stay those
    of the local spec. The norm kind follows ``TransformerConfig.normalization``.

    Raises:
        RuntimeError: Transformer Engine is not importable or the run is not on CUDA
            (the message names ``--transformer-impl``).
    """
    require_transformer_engine()
    attention = ModuleSpec(
        module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=TELayerNormColumnParallelLinear, core_attention=TEDotProductAttention,
            linear_proj=TERowParallelLinear, q_layernorm=TENorm if qk_layernorm else None,
            k_layernorm=TENorm if qk_layernorm else None))
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear))
    return ModuleSpec(module=TETransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=IdentityOp, self_attention=attention, pre_mlp_layernorm=IdentityOp,
        mlp=mlp))
