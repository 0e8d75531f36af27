"""Self-attention split over tensor-parallel ranks by heads.

``linear_qkv`` (column-parallel) projects ``[s, b, h]`` to this rank's query, key and value
heads, laid out per group so a rank holds whole groups (``megacore.transformer.qkv_layout``;
key/value heads are replicated when there are fewer groups than ranks). Optional per-head
norms (``qk_layernorm``) and rotary embeddings are applied, core attention runs on the
local heads, and ``linear_proj`` (row-parallel) sums the heads' contributions back to
``[s, b, h]`` (reduce-scattered to ``[s/tp, b, h]`` under sequence parallelism).

Shapes: ``np`` query heads, ``ng`` key/value heads, ``hn`` head dim, ``nq = np/tp`` and
``nkv = max(ng/tp, 1)`` local heads.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch.func import functional_call

from megacore.parallel_state import ProcessGroupCollection
from megacore.tensor_parallel import checkpoint, copy_to_tensor_model_parallel_region
from megacore.transformer.enums import AttnMaskType
from megacore.transformer.module import MegatronModule
from megacore.transformer.qkv_layout import (
    expand_qkv_rows,
    num_virtual_groups,
    sum_grads_over_kv_replicas,
)
from megacore.transformer.rotary_pos_embedding import apply_rotary_pos_emb
from megacore.transformer.spec_utils import ModuleSpec, build_module
from megacore.transformer.transformer_config import TransformerConfig

__all__ = ["SelfAttention", "SelfAttentionSubmodules"]


@dataclasses.dataclass
class SelfAttentionSubmodules:
    """Parts of :class:`SelfAttention` (classes or specs; None: absent)."""

    linear_qkv: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type, None] = None
    k_layernorm: Union[ModuleSpec, type, None] = None


class SelfAttention(MegatronModule):
    """Multi-head / grouped-query / multi-query self-attention.

    Args:
        config: shape and numerics.
        submodules: the linear layers, core attention and optional q/k norms.
        layer_number: 1-based global layer number.
        attn_mask_type: mask type for core attention.
        pg_collection: process groups (default: ``parallel_state``'s grid).

    forward(hidden_states ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism),
    attention_mask, rotary_pos_emb ``[s, b or 1, 1, rot]``) returns ``(output, bias)``
    with output shaped like the input and the projection bias left for the caller to add
    (bias-dropout-add).
    """

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules,
                 layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.causal,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        np_, ng, hn, tp = (config.num_attention_heads, config.num_query_groups,
                           config.kv_channels, self.tp_size)
        self.kv_replicated = ng < tp
        groups = num_virtual_groups(np_, ng, tp)
        self.num_heads_per_partition = np_ // tp                    # nq
        self.num_groups_per_partition = groups // tp                # nkv
        self.heads_per_group = np_ // groups
        self.hidden_size_per_attention_head = hn
        self._build_projections(submodules, groups)
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number,
            attn_mask_type=attn_mask_type, pg_collection=self.pg_collection)
        self.q_layernorm = self._build_head_norm(submodules.q_layernorm)
        self.k_layernorm = self._build_head_norm(submodules.k_layernorm)

    # -- construction -------------------------------------------------------------------
    def _build_projections(self, submodules: SelfAttentionSubmodules, groups: int) -> None:
        config = self.config
        np_, ng, hn = config.num_attention_heads, config.num_query_groups, config.kv_channels
        expand = dict(num_attention_heads=np_, num_query_groups=ng, kv_channels=hn,
                      tp_size=self.tp_size)

        def qkv_init(master: torch.Tensor) -> torch.Tensor:
            # Draw the logical [ng*(np/ng+2)*hn, h] weight, then lay it out for tp
            # (replicating k/v rows when ng < tp): identical for every tp size.
            logical = torch.empty(ng * (np_ // ng + 2) * hn, master.size(1), dtype=master.dtype)
            config.init_method(logical)
            return master.copy_(expand_qkv_rows(logical, **expand))

        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, groups * (self.heads_per_group + 2) * hn,
            config=config, init_method=qkv_init, gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias,
            # With replicas we add the bias ourselves, wrapped for the replica grad sum.
            skip_bias_add=self.kv_replicated, tp_group=self.tp_group)
        self.linear_proj = build_module(
            submodules.linear_proj, np_ * hn, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group)

    def _build_head_norm(self, spec) -> Optional[torch.nn.Module]:
        if spec is None:
            return None
        norm = build_module(spec, config=self.config,
                            hidden_size=self.hidden_size_per_attention_head,
                            eps=self.config.layernorm_epsilon)
        for param in norm.parameters():
            # Each rank normalizes only its heads: the grad is partial on every rank and
            # is summed over tp inside backward (see _head_norm), not by finalize.
            param.sequence_parallel = False
        return norm

    # -- forward ------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, inference_context=None,
                attn_mask_type: Optional[AttnMaskType] = None):
        query, key, value = self._project_qkv(hidden_states)
        if self.q_layernorm is not None:
            query = self._head_norm(self.q_layernorm, query)
        if self.k_layernorm is not None:
            key = self._head_norm(self.k_layernorm, key)
        if rotary_pos_emb is not None:
            interleaved = self.config.rotary_interleaved
            query = apply_rotary_pos_emb(query, rotary_pos_emb, interleaved)
            key = apply_rotary_pos_emb(key, rotary_pos_emb, interleaved)
        if inference_context is not None:
            key, value = inference_context.append_key_value(self.layer_number, key, value)
        context = self._core_attention(query, key, value, attention_mask, attn_mask_type)
        return self.linear_proj(context)  # [s, b, h] (or [s/tp, b, h]), bias

    def _project_qkv(self, hidden_states: torch.Tensor):
        if self.kv_replicated:
            kw = dict(num_attention_heads=self.config.num_attention_heads,
                      num_query_groups=self.config.num_query_groups,
                      kv_channels=self.hidden_size_per_attention_head, tp_group=self.tp_group)
            weight = sum_grads_over_kv_replicas(self.linear_qkv.weight, **kw)
            mixed, bias = self.linear_qkv(hidden_states, weight=weight)
            if bias is not None:
                mixed = mixed + sum_grads_over_kv_replicas(bias, **kw)
        else:
            mixed, _ = self.linear_qkv(hidden_states)
        s, b = mixed.shape[:2]
        hn, nkv, per = (self.hidden_size_per_attention_head, self.num_groups_per_partition,
                        self.heads_per_group)
        # [s, b, nkv*(per+2)*hn] -> [s, b, nkv, per+2, hn]
        mixed = mixed.view(s, b, nkv, per + 2, hn)
        query, key, value = torch.split(mixed, [per, 1, 1], dim=3)
        # -> [s, b, nq, hn], [s, b, nkv, hn], [s, b, nkv, hn]
        return (query.reshape(s, b, nkv * per, hn), key.reshape(s, b, nkv, hn),
                value.reshape(s, b, nkv, hn))

    def _head_norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return norm(x)
        # forward: identity on the weights; backward: all-reduce their grads over tp, so
        # every rank holds the gradient of all heads (equal to the single process's).
        params = {name: copy_to_tensor_model_parallel_region(p, self.tp_group)
                  for name, p in norm.named_parameters()}
        return functional_call(norm, params, (x,))

    def _core_attention(self, query, key, value, attention_mask, attn_mask_type):
        if self.config.recompute_granularity != "selective":
            return self.core_attention(query, key, value, attention_mask,
                                       attn_mask_type=attn_mask_type)

        def run(q, k, v, mask):
            return self.core_attention(q, k, v, mask, attn_mask_type=attn_mask_type)

        return checkpoint(run, False, query, key, value, attention_mask)
