"""Shared experts: a dense MLP every token goes through next to the routed experts.

``y = MLP_shared(x)``, or with ``moe_shared_expert_gate`` ``y = sigmoid(x w_g) * MLP_shared(x)``
(Qwen2-MoE). Its inner width is ``moe_shared_expert_intermediate_size`` (the sum of the
shared experts' widths: several shared experts of width ``f`` are one MLP of width ``n f``).
It is an ordinary tensor-parallel MLP (``is_expert=False``): its parameters are reduced over
data parallelism like every dense weight, and it sees the MoE layer's input as given
(``[s/tp, b, h]`` under sequence parallelism, else ``[s, b, h]``).

Shapes: ``s`` sequence, ``b`` batch, ``h`` hidden.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megacore import device
from megacore.parallel_state import ProcessGroupCollection
from megacore.transformer.mlp import MLP, MLPSubmodules
from megacore.transformer.module import MegatronModule

__all__ = ["SharedExpertMLP"]


class SharedExpertMLP(MegatronModule):
    """Dense MLP of width ``moe_shared_expert_intermediate_size``, optionally gated.

    Args:
        config: transformer + MoE config.
        submodules: the MLP's linear layers.
        pg_collection: process groups (default: ``parallel_state``'s grid).

    forward(x ``[s, b, h]``) returns ``[s, b, h]`` with the fc2 bias added.
    """

    def __init__(self, config, submodules: MLPSubmodules,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        self.mlp = MLP(config, submodules,
                       ffn_hidden_size=config.moe_shared_expert_intermediate_size,
                       pg_collection=self.pg_collection)
        self.gate_weight = None
        if config.moe_shared_expert_gate:
            self.gate_weight = torch.nn.Parameter(torch.empty(
                1, config.hidden_size, dtype=config.params_dtype, device=device.current_device()))
            if config.perform_initialization:
                master = torch.empty(1, config.hidden_size, dtype=torch.float32)
                config.init_method(master)
                with torch.no_grad():
                    self.gate_weight.copy_(master)
            # Replicated over tp; under sequence parallelism each rank sees its own tokens.
            self.gate_weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out, bias = self.mlp(hidden_states)  # [s, b, h]
        if bias is not None:
            out = out + bias
        if self.gate_weight is not None:
            gate = torch.sigmoid(F.linear(hidden_states, self.gate_weight))  # [s, b, 1]
            out = out * gate
        return out
