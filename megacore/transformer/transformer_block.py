"""A stack of transformer layers: this pipeline stage's share of the model.

The block builds only the layers of its pipeline stage (and virtual stage), numbering them
globally (``layer_number = offset + i + 1``) and building each inside
``init_rng_scope("layer.<n>")``, so a layer's initial weights are the same whatever the
split. It runs them in order, optionally recomputing activations in backward, and applies
the final norm on the last stage.

Layer split: ``megacore.pipeline_parallel.layer_split.get_layer_offset_and_count``
(even split, optional explicit counts on the first and last stage, chunks ordered as
(virtual stage, pipeline rank): with 8 layers, pp=2, vpp=2 the chunks hold layers
[1,2] (rank 0, chunk 0), [3,4] (rank 1, chunk 0), [5,6] (rank 0, chunk 1), [7,8]
(rank 1, chunk 1)).

Recompute (``config.recompute_granularity="full"``): ``uniform`` checkpoints chunks of
``recompute_num_layers`` layers, ``block`` checkpoints the first
``recompute_num_layers`` layers individually and runs the rest normally. Selective
recompute (core attention only) happens inside the attention module.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from megacore.parallel_layout import check_config_matches_layout
from megacore.parallel_state import ProcessGroupCollection
from megacore.pipeline_parallel.layer_split import get_layer_offset_and_count
from megacore.tensor_parallel import checkpoint
from megacore.transformer.enums import AttnMaskType
from megacore.transformer.initialization import init_rng_scope
from megacore.transformer.module import MegatronModule
from megacore.transformer.spec_utils import ModuleSpec, build_module
from megacore.transformer.torch_norm import WrappedTorchNorm
from megacore.transformer.transformer_config import TransformerConfig

__all__ = ["TransformerBlock", "TransformerBlockSubmodules", "get_num_layers_to_build",
           "get_transformer_layer_offset"]


# -- layer split (the pure function lives in megacore.pipeline_parallel.layer_split) -----
def get_transformer_layer_offset(config: TransformerConfig, pp_rank: int,
                                 vp_stage: Optional[int] = None) -> int:
    """0-based global index of the first layer of this model chunk."""
    return _offset_and_count(config, pp_rank, vp_stage)[0]


def get_num_layers_to_build(config: TransformerConfig, pp_rank: int,
                            vp_stage: Optional[int] = None) -> int:
    """Layers in this model chunk."""
    return _offset_and_count(config, pp_rank, vp_stage)[1]


def _offset_and_count(config: TransformerConfig, pp_rank: int, vp_stage: Optional[int]):
    return get_layer_offset_and_count(
        config.num_layers, config.pipeline_model_parallel_size, pp_rank,
        config.virtual_pipeline_model_parallel_size, vp_stage,
        config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage,
        v_shape=config.pipeline_schedule == "zbv")


# -- the block ----------------------------------------------------------------------------
@dataclasses.dataclass
class TransformerBlockSubmodules:
    """Per-layer specs for the *whole* model (``len == num_layers``; the block takes its
    stage's slice) and the final norm."""

    layer_specs: Sequence[ModuleSpec] = ()
    layer_norm: Union[ModuleSpec, type, None] = None


def block_submodules(config: TransformerConfig, spec) -> TransformerBlockSubmodules:
    """Per-layer specs and final norm of ``spec`` (a block spec, or one layer spec)."""
    if isinstance(spec, TransformerBlockSubmodules):
        if len(spec.layer_specs) != config.num_layers:
            raise ValueError(f"TransformerBlockSubmodules.layer_specs has "
                             f"{len(spec.layer_specs)} entries; expected one per layer "
                             f"(num_layers={config.num_layers})")
        return spec
    if isinstance(spec, ModuleSpec) and isinstance(spec.submodules, TransformerBlockSubmodules):
        return block_submodules(config, spec.submodules)
    # A single layer spec used for every layer; the final norm matches its input norm.
    norm = getattr(spec.submodules, "input_layernorm", None) if isinstance(spec, ModuleSpec) \
        else None
    return TransformerBlockSubmodules(layer_specs=[spec] * config.num_layers,
                                      layer_norm=norm or WrappedTorchNorm)


class TransformerBlock(MegatronModule):
    """This stage's transformer layers (plus the final norm on the last stage).

    Args:
        config: the transformer config.
        spec: a layer spec (used for every layer), a ``TransformerBlockSubmodules``, or a
            ``ModuleSpec`` wrapping one.
        post_layer_norm: build the final norm when ``post_process``.
        pre_process: first stage: ``forward`` takes the hidden states as an argument;
            otherwise from ``set_input_tensor``.
        post_process: last stage: apply the final norm.
        pg_collection: process groups (default: ``parallel_state``'s grid).
        vp_stage: virtual pipeline stage of this model chunk (None: not interleaved).

    forward(hidden_states ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism),
    attention_mask, rotary_pos_emb) returns hidden states of the same shape.
    """

    def __init__(self, config: TransformerConfig, spec, post_layer_norm: bool = True,
                 pre_process: bool = True, post_process: bool = True,
                 pg_collection: Optional[ProcessGroupCollection] = None,
                 vp_stage: Optional[int] = None):
        super().__init__(config, pg_collection)
        # The one comparison of the config's degrees with the groups': the layer split
        # below reads the config, every layer splits by its groups.
        check_config_matches_layout(config, self.pg_collection.layout,
                                    where="building TransformerBlock")
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage
        self.input_tensor = None
        pp_rank = dist.get_rank(self.pg_collection.pp)
        offset = get_transformer_layer_offset(config, pp_rank, vp_stage)
        count = get_num_layers_to_build(config, pp_rank, vp_stage)
        submodules = block_submodules(config, spec)
        layers = []
        for i in range(count):
            number = offset + i + 1
            with init_rng_scope(f"layer.{number}"):
                layers.append(build_module(submodules.layer_specs[number - 1], config=config,
                                           layer_number=number,
                                           pg_collection=self.pg_collection))
        self.layers = torch.nn.ModuleList(layers)
        if config.compile_layers:
            for layer in self.layers:
                # Module.compile compiles forward in place: parameter and checkpoint names
                # stay those of the eager layer (no ``_orig_mod.`` prefix).
                layer.compile()
        self.final_layernorm = None
        if post_process and post_layer_norm and submodules.layer_norm is not None:
            self.final_layernorm = build_module(submodules.layer_norm, config=config,
                                                hidden_size=config.hidden_size,
                                                eps=config.layernorm_epsilon)

    def set_input_tensor(self, input_tensor: Optional[torch.Tensor]) -> None:
        self.input_tensor = input_tensor

    def forward(self, hidden_states: Optional[torch.Tensor],
                attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, inference_context=None,
                attn_mask_type: Optional[AttnMaskType] = None) -> torch.Tensor:
        if not self.pre_process:
            hidden_states = self.input_tensor
        if self.config.recompute_granularity == "full" and self.training \
                and inference_context is None:
            hidden_states = self._checkpointed_forward(hidden_states, attention_mask,
                                                       rotary_pos_emb, attn_mask_type)
        else:
            for layer in self.layers:
                hidden_states, _ = layer(hidden_states, attention_mask,
                                         rotary_pos_emb=rotary_pos_emb,
                                         inference_context=inference_context,
                                         attn_mask_type=attn_mask_type)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states

    def _run_layers(self, start: int, end: int, attn_mask_type):
        def run(hidden_states, attention_mask, rotary_pos_emb):
            for layer in self.layers[start:end]:
                hidden_states, _ = layer(hidden_states, attention_mask,
                                         rotary_pos_emb=rotary_pos_emb,
                                         attn_mask_type=attn_mask_type)
            return hidden_states

        return run

    def _checkpointed_forward(self, hidden_states, attention_mask, rotary_pos_emb,
                              attn_mask_type):
        n, k = len(self.layers), self.config.recompute_num_layers
        distribute = self.config.distribute_saved_activations
        if self.config.recompute_method == "uniform":
            for start in range(0, n, k):
                hidden_states = checkpoint(self._run_layers(start, min(start + k, n),
                                                            attn_mask_type),
                                           distribute, hidden_states, attention_mask,
                                           rotary_pos_emb, tp_group=self.pg_collection.tp)
            return hidden_states
        for i in range(n):  # "block": the first k layers of this chunk are recomputed
            run = self._run_layers(i, i + 1, attn_mask_type)
            if i < k:
                hidden_states = checkpoint(run, distribute, hidden_states, attention_mask,
                                           rotary_pos_emb, tp_group=self.pg_collection.tp)
            else:
                hidden_states = run(hidden_states, attention_mask, rotary_pos_emb)
        return hidden_states
