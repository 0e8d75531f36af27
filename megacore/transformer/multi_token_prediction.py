"""Multi-token prediction (MTP, DeepSeek-V3): extra depths that predict tokens further ahead.

Depth ``k`` (1..``mtp_num_layers``) combines the previous depth's hidden states ``h^{k-1}``
(``h^0``: the decoder's output) with the embedding of the tokens ``k`` positions ahead:

    h'  = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])     (2h -> h)
    h^k = final_layernorm(TransformerLayer(h'))
    loss_k = CE(output_layer(h^k)_i, t_{i+k+1})               (labels shifted by k)

The embedding and the output layer are the model's own (shared). Positions whose shifted
label falls past the sequence are masked. The training objective becomes
``lm_loss + mtp_loss_scaling_factor / mtp_num_layers * sum_k loss_k``: the MTP term is
attached to the main loss with :class:`~megacore.transformer.moe.MoEAuxLossAutoScaler`
(its gradient scaled like the main loss), so the reported ``lm loss`` stays the main
model's own, and each ``loss_k`` is kept in :attr:`MultiTokenPrediction.last_losses`
for logging.

Shapes: ``s`` sequence (``s/tp`` under sequence parallelism), ``b`` batch, ``h`` hidden.
Supported: tensor and sequence parallelism, data and expert parallelism, and pipeline
parallelism (the depths run on the last stage, which keeps its own copy of the word
embedding: see ``GPTModel``). Not supported: context parallelism (shifted labels cross cp
ranks); the model refuses it.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from megacore.parallel_state import ProcessGroupCollection
from megacore.tensor_parallel import ColumnParallelLinear, scatter_to_sequence_parallel_region
from megacore.transformer.initialization import init_rng_scope
from megacore.transformer.module import MegatronModule
from megacore.transformer.moe.load_balancing import MoEAuxLossAutoScaler
from megacore.transformer.spec_utils import build_module
from megacore.transformer.transformer_config import TransformerConfig

__all__ = ["MultiTokenPrediction", "MultiTokenPredictionLayer", "roll_left"]


def roll_left(t: torch.Tensor, k: int, fill) -> torch.Tensor:
    """``[b, s]`` shifted left by ``k`` positions, the last ``k`` set to ``fill``."""
    out = torch.roll(t, -k, dims=1)
    out[:, -k:] = fill
    return out


class MultiTokenPredictionLayer(MegatronModule):
    """One MTP depth (see the module docstring)."""

    def __init__(self, config: TransformerConfig, layer_spec, norm, depth: int,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        h = config.hidden_size

        def make_norm():
            return build_module(norm, config=config, hidden_size=h, eps=config.layernorm_epsilon)

        self.enorm, self.hnorm = make_norm(), make_norm()
        # [s(/tp), b, 2h] -> [s, b, h] whole on every rank (scattered again under sp).
        self.eh_proj = ColumnParallelLinear(2 * h, h, config=config,
                                            init_method=config.init_method, bias=False,
                                            gather_output=True, tp_group=self.tp_group)
        self.transformer_layer = build_module(layer_spec, config=config,
                                              layer_number=config.num_layers + depth,
                                              pg_collection=self.pg_collection)
        self.final_layernorm = make_norm()

    def forward(self, hidden_states: torch.Tensor, embedded: torch.Tensor,
                attention_mask, rotary_pos_emb) -> torch.Tensor:
        x = torch.cat([self.enorm(embedded), self.hnorm(hidden_states)], dim=-1)
        x, _ = self.eh_proj(x)  # [s, b, h]
        if self.config.sequence_parallel and self.tp_size > 1:
            x = scatter_to_sequence_parallel_region(x, self.tp_group)  # [s/tp, b, h]
        x, _ = self.transformer_layer(x, attention_mask, rotary_pos_emb=rotary_pos_emb)
        return self.final_layernorm(x)


class MultiTokenPrediction(MegatronModule):
    """``mtp_num_layers`` sequential :class:`MultiTokenPredictionLayer` depths."""

    def __init__(self, config: TransformerConfig, layer_spec, norm,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        depths = []
        for k in range(1, config.mtp_num_layers + 1):
            with init_rng_scope(f"mtp.{k}"):
                depths.append(MultiTokenPredictionLayer(config, layer_spec, norm, k,
                                                        self.pg_collection))
        self.layers = torch.nn.ModuleList(depths)
        self.last_losses: List[torch.Tensor] = []
        """Each depth's mean loss over the last micro-batch (detached), for logging."""
        self.aux_loss_scale = 1.0
        """Gradient scale of the attached loss, set like the MoE routers' by
        :func:`~megacore.transformer.moe.set_moe_aux_loss_scale` (loss scale /
        micro-batches)."""

    def attach_loss(self, loss: torch.Tensor, hidden_states: torch.Tensor,
                    input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
                    labels: torch.Tensor, loss_mask: Optional[torch.Tensor], attention_mask,
                    rotary_pos_emb, embed: Callable, token_loss: Callable) -> torch.Tensor:
        """``loss`` ``[b, s]`` (unchanged in value) with the MTP objective attached.

        Args:
            hidden_states: the decoder's output ``[s(/tp), b, h]``.
            embed: ``(input_ids, position_ids) -> [s(/tp), b, h]`` (the model's embedding).
            token_loss: ``(hidden_states, labels) -> [b, s]`` per-token loss through the
                model's output layer.
        """
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None \
            else loss_mask.float()
        total, self.last_losses = 0.0, []
        for k, layer in enumerate(self.layers, start=1):
            ids_k = roll_left(input_ids, k, 0)
            hidden_states = layer(hidden_states, embed(ids_k, position_ids), attention_mask,
                                  rotary_pos_emb)
            mask_k = roll_left(mask, k, 0.0)
            per_token = token_loss(hidden_states, roll_left(labels, k, 0))  # [b, s]
            loss_k = (per_token.float() * mask_k).sum() / mask_k.sum().clamp(min=1.0)
            self.last_losses.append(loss_k.detach())
            total = total + loss_k
        scale = self.config.mtp_loss_scaling_factor / len(self.layers)
        if torch.is_grad_enabled() and self.training:
            loss = MoEAuxLossAutoScaler.apply(loss, scale * total, self.aux_loss_scale)
        return loss
