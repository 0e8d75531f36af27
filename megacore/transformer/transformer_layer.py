"""One pre-norm transformer layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

Each branch ends in bias-dropout-add: the branch's bias (left unadded by its row-parallel
projection) is added, hidden dropout applied, and the residual added. Activations are
``[s, b, h]``, or ``[s/tp, b, h]`` with sequence parallelism; the dropout mask is drawn
for the full ``[s, b, h]`` and sliced (``megacore.transformer.dropout``), so it is the
same for every tp layout.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from megacore.parallel_state import ProcessGroupCollection
from megacore.transformer.dropout import sequence_dropout
from megacore.transformer.enums import AttnMaskType
from megacore.transformer.module import MegatronModule
from megacore.transformer.spec_utils import IdentityOp, ModuleSpec, build_module
from megacore.transformer.transformer_config import TransformerConfig

__all__ = ["TransformerLayer", "TransformerLayerSubmodules"]


@dataclasses.dataclass
class TransformerLayerSubmodules:
    """Parts of :class:`TransformerLayer` (IdentityOp: absent)."""

    input_layernorm: Union[ModuleSpec, type] = IdentityOp
    self_attention: Union[ModuleSpec, type] = IdentityOp
    pre_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp
    mlp: Union[ModuleSpec, type] = IdentityOp


class TransformerLayer(MegatronModule):
    """Pre-norm transformer layer.

    Args:
        config: the transformer config.
        submodules: norms, attention and MLP.
        layer_number: 1-based *global* layer number (the same whatever the pipeline split).
        hidden_dropout: overrides ``config.hidden_dropout`` when given.
        pg_collection: process groups (default: ``parallel_state``'s grid).

    forward(hidden_states ``[s, b, h]``, attention_mask, rotary_pos_emb) returns
    ``(hidden_states, None)`` (Megatron's ``(output, context)`` pair).
    """

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules,
                 layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout if hidden_dropout is None else hidden_dropout
        norm_kwargs = dict(config=config, hidden_size=config.hidden_size,
                           eps=config.layernorm_epsilon)
        self.input_layernorm = build_module(submodules.input_layernorm, **norm_kwargs)
        self.self_attention = build_module(submodules.self_attention, config=config,
                                           layer_number=layer_number,
                                           pg_collection=self.pg_collection)
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, **norm_kwargs)
        self.mlp = build_module(submodules.mlp, config=config, pg_collection=self.pg_collection)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, inference_context=None,
                attn_mask_type: Optional[AttnMaskType] = None):
        normed = self.input_layernorm(hidden_states)
        attn_out, attn_bias = self.self_attention(
            normed, attention_mask, rotary_pos_emb=rotary_pos_emb,
            inference_context=inference_context, attn_mask_type=attn_mask_type)
        residual = normed if self.config.apply_residual_connection_post_layernorm \
            else hidden_states
        hidden_states = self._bias_dropout_add(attn_out, attn_bias, residual)

        normed = self.pre_mlp_layernorm(hidden_states)
        mlp_out, mlp_bias = self.mlp(normed)
        residual = normed if self.config.apply_residual_connection_post_layernorm \
            else hidden_states
        return self._bias_dropout_add(mlp_out, mlp_bias, residual), None

    def _bias_dropout_add(self, x: torch.Tensor, bias: Optional[torch.Tensor],
                          residual: torch.Tensor) -> torch.Tensor:
        if bias is not None:
            x = x + bias
        # x is [s/cp(/tp), b, h]: the mask of the full [s, b, h], our rows of it.
        x = sequence_dropout(x, self.hidden_dropout, self.training, tp_size=self.tp_size,
                             tp_rank=self.tp_rank, sequence_parallel=self.config.sequence_parallel,
                             cp_size=self.cp_size, cp_rank=self.cp_rank,
                             stream=f"dropout/layer{self.layer_number}")
        return residual + x
