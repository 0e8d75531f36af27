"""Multi-latent attention (MLA, DeepSeek-V2/V3): keys and values from a low-rank latent.

Per token, ``linear_kv_down_proj`` compresses the hidden state to a latent ``c_kv`` of
width ``kv_lora_rank`` plus one shared rotary key ``k_pe`` (``qk_pos_emb_head_dim``);
``linear_kv_up_proj`` expands the normalized latent to every head's key part without
position (``qk_head_dim``) and value (``v_head_dim``). Queries come from the hidden state
directly (``q_lora_rank`` None) or through their own latent (``linear_q_down_proj``, norm,
``linear_q_up_proj``), each head with a rotary part. A head's key is ``[k_nope, k_pe]``
and the score scale ``1/sqrt(qk_head_dim + qk_pos_emb_head_dim)``.

Tensor parallelism splits the heads: the up-projections are column-parallel and
``linear_proj`` row-parallel, as in :class:`~megacore.transformer.attention.SelfAttention`.
The down-projections and latent norms are replicated: every rank computes the same latent
from the whole sequence (under sequence parallelism the input is all-gathered once, with a
backward that only splits, because the latent's gradient is already summed over tp by
the up-projections). So their gradients are complete on every rank and need no reduction.

Generation caches the compressed latent ``c_kv`` and the rotated ``k_pe`` per position
(``kv_lora_rank + qk_pos_emb_head_dim`` values per token instead of
``2 * heads * head_dim``), re-expanding keys and values at each step.

Context parallelism (``context_parallel_size > 1``): each rank holds its load-balanced
share ``[s/cp, b, h]`` of the sequence (chunks ``r`` and ``2cp-1-r``), computes its tokens'
queries, latents and expanded keys/values locally, and the ring of
:mod:`megacore.transformer.context_parallel.ring_attention` passes the *expanded* per-head
keys ``[s/cp, b, nq, qk + r]`` and values ``[s/cp, b, nq, vd]``, as Megatron-Core does.
Passing the latent ``[s/cp, b, L + r]`` instead would move ``nq * (qk + r + vd) / (L + r)``
times less data (DeepSeek-V3 at tp 1: 128 * 320 / 576, ~71x), but every rank would then
run the up-projection of every visiting block, forward and again in backward, with the
up-projection's weight gradient accumulated on the rank that computed it rather than the
block's owner: more flops than the attention block itself at DeepSeek widths, and a ring
that knows about MLA. The expanded keys and values go through the attention ring; since
values are narrower than keys (``vd`` vs ``qk + r``), it zero-pads values to the key
width inside the ring and slices the output back (exact; see the ring's docstring).
The decoupled rotary part uses each token's global position: ``GPTModel`` gives this
rank's angles for its zigzag positions (or the angles of the ``position_ids`` passed).
Padding masks and the generation cache are refused under cp by the ring's core attention.

YaRN (``config.rope_type == "yarn"``, DeepSeek-V3): ``GPTModel`` gives the YaRN angles
(:mod:`megacore.transformer.yarn_rotary_pos_embedding`); here the rotated query and key
parts are multiplied by the cos/sin factor and the softmax scale by
``m(factor, mscale_all_dim)^2``, as ``transformers``' DeepSeek-V3 does.

Shapes: ``s`` sequence, ``b`` batch, ``h`` hidden, ``nq = heads / tp`` local heads,
``qk`` = ``qk_head_dim``, ``r`` = ``qk_pos_emb_head_dim``, ``vd`` = ``v_head_dim``,
``L`` = ``kv_lora_rank``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from megacore import device
from megacore.parallel_state import ProcessGroupCollection
from megacore.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megacore.transformer.enums import AttnMaskType
from megacore.transformer.module import MegatronModule
from megacore.transformer.rotary_pos_embedding import apply_rotary_pos_emb
from megacore.transformer.spec_utils import ModuleSpec, build_module
from megacore.transformer.transformer_config import TransformerConfig
from megacore.transformer.yarn_rotary_pos_embedding import (
    yarn_concentration_factor,
    yarn_softmax_scale_factor,
)

__all__ = ["MLASelfAttention", "MLASelfAttentionSubmodules", "ReplicatedLinear"]


@dataclasses.dataclass
class MLASelfAttentionSubmodules:
    """Parts of :class:`MLASelfAttention` (classes or specs)."""

    linear_q_proj: Union[ModuleSpec, type] = None       # used when q_lora_rank is None
    linear_q_down_proj: Union[ModuleSpec, type] = None
    linear_q_up_proj: Union[ModuleSpec, type] = None
    linear_kv_down_proj: Union[ModuleSpec, type] = None
    linear_kv_up_proj: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = None
    kv_layernorm: Union[ModuleSpec, type] = None


class ReplicatedLinear(MegatronModule):
    """``y = x W^T`` with the same whole ``W [out, in]`` on every tensor-parallel rank.

    The weight is drawn as one master matrix (layout-independent initialization) and its
    gradient is complete on every rank (see the module docstring), so it is not marked
    for a tp reduction.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 init_method=None, pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size,
                                                     dtype=config.params_dtype,
                                                     device=device.current_device()))
        if config.perform_initialization:
            master = torch.empty(output_size, input_size, dtype=torch.float32)
            (init_method or config.init_method)(master)
            with torch.no_grad():
                self.weight.copy_(master)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MLASelfAttention(MegatronModule):
    """Multi-latent self-attention (see the module docstring).

    forward(hidden_states ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism;
    ``s`` is this rank's ``s/cp`` under context parallelism), attention_mask,
    rotary_pos_emb ``[s, b or 1, 1, r]``) returns ``(output, bias)`` like
    :class:`~megacore.transformer.attention.SelfAttention`.
    """

    def __init__(self, config: TransformerConfig, submodules: MLASelfAttentionSubmodules,
                 layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.causal,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.nq = config.num_attention_heads // self.tp_size
        self.qk, self.rope, self.vd = (config.qk_head_dim, config.qk_pos_emb_head_dim,
                                       config.v_head_dim)
        # YaRN's factor on cos/sin, i.e. on the rotated query and key parts (1: none).
        self.rope_mscale = 1.0 if config.rope_type != "yarn" else yarn_concentration_factor(
            config.rotary_scaling_factor, config.mscale, config.mscale_all_dim)
        # The up-projections read the latent, already whole on every rank: they must not
        # all-gather it again under sequence parallelism.
        self._latent_config = dataclasses.replace(config, sequence_parallel=False)
        self._build_query(submodules)
        self._build_key_value(submodules)
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number,
            attn_mask_type=attn_mask_type, softmax_scale=self.softmax_scale(config),
            pg_collection=self.pg_collection)
        self.linear_proj = build_module(
            submodules.linear_proj, config.num_attention_heads * self.vd, config.hidden_size,
            config=config, init_method=config.output_layer_init_method,
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True,
            tp_group=self.tp_group)

    @staticmethod
    def softmax_scale(config: TransformerConfig) -> float:
        """``config.softmax_scale``, else ``1/sqrt(qk + r)`` (times YaRN's
        ``m(factor, mscale_all_dim)^2`` under ``rope_type="yarn"``)."""
        if config.softmax_scale is not None:
            return config.softmax_scale
        scale = 1.0 / math.sqrt(config.qk_head_dim + config.qk_pos_emb_head_dim)
        if config.rope_type == "yarn":
            scale *= yarn_softmax_scale_factor(config.rotary_scaling_factor,
                                               config.mscale_all_dim)
        return scale

    # -- construction -------------------------------------------------------------------
    def _column(self, spec, input_size: int, output_size: int):
        return build_module(spec, input_size, output_size, config=self._latent_config,
                            init_method=self.config.init_method, gather_output=False,
                            bias=False, tp_group=self.tp_group)

    def _norm(self, spec, width: int):
        norm = build_module(spec, config=self._latent_config, hidden_size=width,
                            eps=self.config.layernorm_epsilon)
        for param in norm.parameters():
            param.sequence_parallel = False  # whole latent on every rank: complete grads
        return norm

    def _build_query(self, submodules: MLASelfAttentionSubmodules) -> None:
        config, heads = self.config, self.config.num_attention_heads
        width = heads * (self.qk + self.rope)
        if config.q_lora_rank is None:
            self.linear_q_proj = self._column(submodules.linear_q_proj, config.hidden_size,
                                              width)
            return
        self.linear_q_down_proj = build_module(
            submodules.linear_q_down_proj, config.hidden_size, config.q_lora_rank,
            config=config, pg_collection=self.pg_collection)
        self.q_layernorm = self._norm(submodules.q_layernorm, config.q_lora_rank)
        self.linear_q_up_proj = self._column(submodules.linear_q_up_proj, config.q_lora_rank,
                                             width)

    def _build_key_value(self, submodules: MLASelfAttentionSubmodules) -> None:
        config = self.config
        self.linear_kv_down_proj = build_module(
            submodules.linear_kv_down_proj, config.hidden_size, config.kv_lora_rank + self.rope,
            config=config, pg_collection=self.pg_collection)
        self.kv_layernorm = self._norm(submodules.kv_layernorm, config.kv_lora_rank)
        self.linear_kv_up_proj = self._column(
            submodules.linear_kv_up_proj, config.kv_lora_rank,
            config.num_attention_heads * (self.qk + self.vd))

    # -- forward ------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, inference_context=None,
                attn_mask_type: Optional[AttnMaskType] = None):
        if self.config.sequence_parallel and self.tp_size > 1:
            # [s/tp, b, h] -> [s, b, h]; backward splits (the grad is complete here).
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.tp_group)
        query = self._query(hidden_states, rotary_pos_emb)          # [s, b, nq, qk + r]
        latent, k_pe = self._latent(hidden_states, rotary_pos_emb)   # [s, b, 1, L], [s, b, 1, r]
        if inference_context is not None:
            latent, k_pe = inference_context.append_key_value(self.layer_number, latent, k_pe)
        key, value = self._expand(latent, k_pe)
        context = self.core_attention(query, key, value, attention_mask,
                                      attn_mask_type=attn_mask_type)  # [s, b, nq * vd]
        return self.linear_proj(context)

    def _query(self, hidden_states, rotary_pos_emb):
        if self.config.q_lora_rank is None:
            q, _ = self.linear_q_proj(hidden_states)
        else:
            q, _ = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(hidden_states)))
        s, b = q.shape[:2]
        q_nope, q_pe = q.view(s, b, self.nq, self.qk + self.rope).split([self.qk, self.rope], -1)
        if rotary_pos_emb is not None:
            q_pe = self._rotate(q_pe, rotary_pos_emb)
        return torch.cat([q_nope, q_pe], dim=-1)

    def _rotate(self, x, rotary_pos_emb):
        x = apply_rotary_pos_emb(x, rotary_pos_emb, self.config.rotary_interleaved)
        return x if self.rope_mscale == 1.0 else x * self.rope_mscale

    def _latent(self, hidden_states, rotary_pos_emb):
        # [s, b, h] -> [s, b, L + r] -> c_kv [s, b, 1, L], k_pe [s, b, 1, r]
        compressed = self.linear_kv_down_proj(hidden_states)
        c_kv, k_pe = compressed.unsqueeze(2).split([self.config.kv_lora_rank, self.rope], -1)
        # k_pe reaches attention directly, where each rank uses it for its own heads only:
        # forward identity, backward all-reduce, so its gradient is complete (as c_kv's is
        # through the column-parallel up-projection).
        k_pe = copy_to_tensor_model_parallel_region(k_pe, self.tp_group)
        if rotary_pos_emb is not None:
            k_pe = self._rotate(k_pe, rotary_pos_emb)
        return self.kv_layernorm(c_kv), k_pe

    def _expand(self, latent, k_pe):
        # [sk, b, 1, L] -> [sk, b, nq * (qk + vd)] -> k_nope [sk, b, nq, qk], v [sk, b, nq, vd]
        kv, _ = self.linear_kv_up_proj(latent.squeeze(2))
        sk, b = kv.shape[:2]
        k_nope, value = kv.view(sk, b, self.nq, self.qk + self.vd).split([self.qk, self.vd], -1)
        key = torch.cat([k_nope, k_pe.expand(sk, b, self.nq, self.rope)], dim=-1)
        return key, value.contiguous()
