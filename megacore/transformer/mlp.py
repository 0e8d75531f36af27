"""Feed-forward block split over tensor-parallel ranks: ``fc2(act(fc1(x)))``.

``linear_fc1`` is column-parallel (``[s, b, h] -> [s, b, f/tp]``), the activation is
elementwise on the local slice, and ``linear_fc2`` is row-parallel (``[s, b, f/tp] ->
[s, b, h]``, summed over tp). With ``gated_linear_unit`` (SwiGLU when the activation is
SiLU) fc1 produces ``2f`` features ``[gate; up]``; it is split with stride 2 so every rank
holds the *matching* halves ``[gate_r; up_r]`` and the logical weight is the same for
every tp size (``_shard_master_weight`` in ``megacore.tensor_parallel.layers``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from megacore.parallel_state import ProcessGroupCollection
from megacore.transformer.module import MegatronModule
from megacore.transformer.spec_utils import ModuleSpec, build_module
from megacore.transformer.transformer_config import TransformerConfig

__all__ = ["MLP", "MLPSubmodules"]


@dataclasses.dataclass
class MLPSubmodules:
    """Parts of :class:`MLP`."""

    linear_fc1: Union[ModuleSpec, type] = None
    linear_fc2: Union[ModuleSpec, type] = None


class MLP(MegatronModule):
    """Two-layer MLP (optionally gated).

    Args:
        config: widths, activation, bias and init settings.
        submodules: the two linear layers.
        input_size: input width (default ``config.hidden_size``).
        ffn_hidden_size: inner width (default ``config.ffn_hidden_size``).
        is_expert: build expert layers (MoE: expert-tp group, no sequence parallel).
        pg_collection: process groups (default: ``parallel_state``'s grid).

    forward(hidden_states ``[s, b, h]``) returns ``(output, bias)``; the fc2 bias is left
    for the caller's bias-dropout-add.
    """

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules,
                 input_size: Optional[int] = None, ffn_hidden_size: Optional[int] = None,
                 is_expert: bool = False,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        tp_group = self.pg_collection.expt_tp if is_expert else self.tp_group
        hidden = config.hidden_size if input_size is None else input_size
        ffn = config.ffn_hidden_size if ffn_hidden_size is None else ffn_hidden_size
        gated = config.gated_linear_unit
        self.activation_func = config.activation_func
        self.gated = gated
        self.linear_fc1 = build_module(
            submodules.linear_fc1, hidden, 2 * ffn if gated else ffn, config=config,
            init_method=config.init_method, bias=config.add_bias_linear, gather_output=False,
            # The bias goes into the matmul (addmm): nothing fuses it with the activation.
            stride=2 if gated else 1, skip_bias_add=False, is_expert=is_expert,
            tp_group=tp_group)
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn, hidden, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, is_expert=is_expert,
            tp_group=tp_group)

    def forward(self, hidden_states: torch.Tensor):
        intermediate, _ = self.linear_fc1(hidden_states)  # [s, b, f/tp] or [s, b, 2f/tp]
        if self.gated:
            gate, up = intermediate.chunk(2, dim=-1)  # [gate_r; up_r] -> 2 x [s, b, f/tp]
            intermediate = self.activation_func(gate) * up
        else:
            intermediate = self.activation_func(intermediate)
        return self.linear_fc2(intermediate)  # [s, b, h] (or [s/tp, b, h]), bias
