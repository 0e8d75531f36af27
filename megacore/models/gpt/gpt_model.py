"""``GPTModel``: embedding, decoder block, output layer and loss, one pipeline stage of it.

Data flow (sequence-first inside; ``[s/tp, b, h]`` where sequence parallelism splits)::

    input_ids [b, s] -> LanguageModelEmbedding -> [s, b, h]        (pre_process stages)
                     -> TransformerBlock (this stage's layers)       -> [s, b, h]
                     -> output_layer (column-parallel)               -> logits [s, b, V/tp]
       labels given:  vocab-parallel cross entropy -> loss [b, s]    (post_process stages)
       otherwise:     logits [b, s, V/tp] (parallel_output) or [b, s, V] gathered

``V`` is the vocabulary padded to a multiple of tp; padding columns are excluded from the
loss and set to ``-inf`` in returned logits, so the model computes the same function for
every tp size.

Tied word embeddings (``share_embeddings_and_output_weights``): on a single stage the
output layer reuses the embedding table. With pipeline stages the last stage owns a copy
marked ``shared_embedding=True``; :meth:`GPTModel.setup_embeddings_and_output_layer`
makes it equal to the first stage's table (zeros it and all-reduces over the embedding
group, as Megatron-Core does), and ``finalize_model_grads`` keeps their gradients summed.

Multi-token prediction (``config.mtp_num_layers``) runs on the last stage and embeds the
shifted tokens there. With pipeline stages that stage (``mtp_process``) holds its own
``embedding`` (the word table only: rope or no position embedding), kept equal to the
first stage's exactly like a tied output weight (``shared_embedding=True``, zeroed and
all-reduced at set-up, gradients summed over the embedding group), tied or not. When tied,
the last stage's output layer reads that table and allocates no weight, as in
Megatron-Core. Checkpoints save the table once (``megacore.checkpointing.sharded_state``).
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.distributed as dist

from megacore.models.common.embeddings.language_model_embedding import (
    WORD_EMBEDDINGS_INIT_KEY,
    LanguageModelEmbedding,
    padded_vocab_init_method,
)
from megacore.parallel_state import ProcessGroupCollection
from megacore.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy
from megacore.transformer.context_parallel import get_position_ids_on_cp_rank
from megacore.transformer.initialization import init_rng_scope
from megacore.transformer.multi_token_prediction import MultiTokenPrediction
from megacore.transformer.transformer_block import block_submodules
from megacore.transformer.module import MegatronModule
from megacore.transformer.rotary_pos_embedding import RotaryEmbedding
from megacore.transformer.transformer_block import TransformerBlock
from megacore.transformer.transformer_config import TransformerConfig
from megacore.transformer.yarn_rotary_pos_embedding import YarnRotaryEmbedding
from megacore.vocab_padding import pad_vocab_size

__all__ = ["GPTModel"]

_POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")


class GPTModel(MegatronModule):
    """Decoder-only transformer language model (one pipeline stage of it).

    Args:
        config: the transformer config.
        transformer_layer_spec: spec of each layer (or a block spec).
        vocab_size: number of real tokens (padded internally to a multiple of tp).
        max_sequence_length: longest sequence (rows of the learned position table).
        pre_process: this stage holds the embedding.
        post_process: this stage holds the final norm, output layer and loss.
        fp16_lm_cross_entropy: compute the loss on 16-bit logits (default: float32).
        parallel_output: return logits split over tp; False gathers them.
        share_embeddings_and_output_weights: tie the output layer to the word embedding.
        position_embedding_type: ``"learned_absolute"``, ``"rope"`` or ``"none"``.
        rotary_percent: fraction of each head rotated by RoPE.
        rotary_base: RoPE frequency base.
        seq_len_interpolation_factor: RoPE linear position interpolation factor.
        rope_scaling: Llama 3.1+ RoPE frequency scaling (``RotaryEmbedding``).
        rope_scaling_factor, rope_scaling_low_freq_factor, rope_scaling_high_freq_factor,
        rope_scaling_original_max_position_embeddings: its parameters.
            (YaRN, ``config.rope_type == "yarn"``, takes its parameters from the config.)
        pg_collection: process groups (default: ``parallel_state``'s grid).
        vp_stage: virtual pipeline stage of this model chunk.
    """

    def __init__(self, config: TransformerConfig, transformer_layer_spec, vocab_size: int,
                 max_sequence_length: int, pre_process: bool = True, post_process: bool = True,
                 fp16_lm_cross_entropy: bool = False, parallel_output: bool = True,
                 share_embeddings_and_output_weights: bool = False,
                 position_embedding_type: str = "learned_absolute", rotary_percent: float = 1.0,
                 rotary_base: int = 10000, seq_len_interpolation_factor: Optional[float] = None,
                 rope_scaling: bool = False, rope_scaling_factor: float = 8.0,
                 rope_scaling_low_freq_factor: float = 1.0,
                 rope_scaling_high_freq_factor: float = 4.0,
                 rope_scaling_original_max_position_embeddings: int = 8192,
                 pg_collection: Optional[ProcessGroupCollection] = None,
                 vp_stage: Optional[int] = None):
        if (share_embeddings_and_output_weights and config.pipeline_schedule == "zbv"
                and config.pipeline_model_parallel_size > 1):
            # Both ends are chunks of pipeline rank 0; the embedding group's tie assumes
            # the first and the last pipeline rank.
            raise ValueError("--pipeline-schedule zbv needs --untie-embeddings-and-output-"
                             "weights (share_embeddings_and_output_weights=False)")
        super().__init__(config, pg_collection)
        if position_embedding_type not in _POSITION_EMBEDDING_TYPES:
            raise ValueError(f"position_embedding_type must be one of "
                             f"{_POSITION_EMBEDDING_TYPES}, got {position_embedding_type!r}")
        self.vocab_size = vocab_size
        self.padded_vocab_size = pad_vocab_size(vocab_size, tensor_model_parallel_size=self.tp_size)
        self.max_sequence_length = max_sequence_length
        self.pre_process, self.post_process = pre_process, post_process
        self.fp16_lm_cross_entropy = fp16_lm_cross_entropy
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.position_embedding_type = position_embedding_type
        self.vp_stage = vp_stage
        self.mtp_process = post_process and bool(config.mtp_num_layers)
        """This stage runs multi-token prediction (the last one) and so holds an embedding."""
        if config.mtp_num_layers:
            self._check_mtp_supported()
        # Registered before the decoder: finalize_model_grads flattens the shared_embedding
        # params of the first and the last stage in registration order.
        if pre_process or self.mtp_process:
            self.embedding = LanguageModelEmbedding(
                config, vocab_size, max_sequence_length, position_embedding_type,
                pg_collection=self.pg_collection)
        self.rotary_pos_emb = None
        if config.rope_type == "yarn" and position_embedding_type != "rope":
            raise ValueError(f"--rope-type yarn needs --position-embedding-type rope, got "
                             f"{position_embedding_type!r}")
        if position_embedding_type == "rope" and config.rope_type == "yarn":
            self.rotary_pos_emb = _yarn_rotary_embedding(
                config, rotary_percent, rotary_base, seq_len_interpolation_factor, rope_scaling)
        elif position_embedding_type == "rope":
            # MLA rotates only each head's decoupled rotary part.
            rotary_dim = config.qk_pos_emb_head_dim if config.multi_latent_attention \
                else config.kv_channels
            self.rotary_pos_emb = RotaryEmbedding(
                rotary_dim, rotary_percent, config.rotary_interleaved,
                seq_len_interpolation_factor, rotary_base, rope_scaling, rope_scaling_factor,
                rope_scaling_low_freq_factor, rope_scaling_high_freq_factor,
                rope_scaling_original_max_position_embeddings)
        self.decoder = TransformerBlock(config, transformer_layer_spec, pre_process=pre_process,
                                        post_process=post_process,
                                        pg_collection=self.pg_collection, vp_stage=vp_stage)
        self.mtp = None
        if post_process:
            self.output_layer = self._build_output_layer()
            if self.mtp_process:
                self.mtp = self._build_mtp(transformer_layer_spec)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def _build_output_layer(self) -> ColumnParallelLinear:
        tied = self.share_embeddings_and_output_weights
        # A tied copy on a later stage is drawn like the word embedding it mirrors.
        with init_rng_scope(WORD_EMBEDDINGS_INIT_KEY if tied else "output_layer"):
            return ColumnParallelLinear(
                self.config.hidden_size, self.padded_vocab_size, config=self.config,
                init_method=padded_vocab_init_method(self.config.init_method, self.vocab_size),
                bias=False, gather_output=not self.parallel_output,
                skip_weight_param_allocation=(self.pre_process or self.mtp_process) and tied,
                tp_group=self.tp_group)

    def _check_mtp_supported(self) -> None:
        """Refuse, on every stage alike, the layouts multi-token prediction cannot run."""
        pp_size = dist.get_world_size(self.pg_collection.pp)
        if pp_size > 1 and self.position_embedding_type == "learned_absolute":
            raise ValueError("multi-token prediction on the last pipeline stage keeps a copy "
                             "of the word embedding only: --mtp-num-layers with "
                             "--pipeline-model-parallel-size > 1 needs "
                             "--position-embedding-type rope or none, not learned_absolute")
        if self.config.calculate_per_token_loss:
            raise ValueError("multi-token prediction normalizes its loss per micro-batch: "
                             "--mtp-num-layers with --calculate-per-token-loss is not "
                             "supported yet")
        if dist.get_world_size(self.pg_collection.cp) > 1:
            raise ValueError("multi-token prediction shifts labels across the sequence: "
                             "--mtp-num-layers with --context-parallel-size > 1 is not "
                             "supported")

    def _build_mtp(self, spec) -> MultiTokenPrediction:
        submodules = block_submodules(self.config, spec)
        return MultiTokenPrediction(self.config, submodules.layer_specs[-1],
                                    submodules.layer_norm, pg_collection=self.pg_collection)

    def fully_shard_units(self) -> List[torch.nn.Module]:
        """Modules FSDP2 gathers one at a time (``megacore.distributed.fully_shard_model``):
        the embedding, each transformer layer, the output layer, each multi-token
        prediction depth. With tied embeddings the
        output layer gets its weight as an argument from :meth:`forward` (the root), so it
        stays in the root unit, and so does an embedding whose table it uses on this
        same stage."""
        units: List[torch.nn.Module] = list(self.decoder.layers)
        tied = self.share_embeddings_and_output_weights
        if self.pre_process and not (tied and self.post_process):
            units.insert(0, self.embedding)
        if self.post_process and not tied:
            units.append(self.output_layer)
        if self.mtp is not None:  # each multi-token prediction depth (its MoE experts too)
            units += list(self.mtp.layers)
        return units

    # -- tied embeddings ----------------------------------------------------------------
    def shared_embedding_or_output_weight(self) -> Optional[torch.Tensor]:
        """The word-embedding table (first stage, or a multi-token prediction stage) or the
        output weight (last stage)."""
        if self.pre_process or self.mtp_process:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    def setup_embeddings_and_output_layer(self) -> None:
        """Mark tied weights and make the last stage's copy equal the first stage's table.

        Must be called on every rank of the embedding group (it is, from ``__init__``).
        """
        if self.pre_process or self.mtp_process:
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process and self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        # Untied, the last stage still keeps a copy of the table for multi-token prediction.
        if not (self.share_embeddings_and_output_weights or self.config.mtp_num_layers):
            return
        pp_size = dist.get_world_size(self.pg_collection.pp)
        if pp_size == 1:
            return
        weight = self.shared_embedding_or_output_weight()
        weight.shared_embedding = True
        if self.post_process and not self.pre_process:
            with torch.no_grad():
                weight.zero_()  # the all-reduce below then copies the first stage's table
            weight.shared = True
        embd_group = self.pg_collection.embd
        if embd_group is not None and dist.get_world_size(embd_group) > 1:
            with torch.no_grad():
                dist.all_reduce(weight.data, group=embd_group)

    # -- pipeline -----------------------------------------------------------------------
    def set_input_tensor(self, input_tensor: Union[torch.Tensor, List[torch.Tensor], None]) -> None:
        """Input hidden states ``[s, b, h]`` of a stage without the embedding."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError("GPTModel takes one input tensor per stage")
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    # -- forward ------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                attention_mask: Optional[torch.Tensor],
                decoder_input: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, inference_context=None,
                inference_params=None, loss_mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Loss ``[b, s]`` when ``labels`` are given, else logits (see module docstring).

        ``loss_mask`` ``[b, s]`` is only read by multi-token prediction (which normalizes
        its own loss); the returned loss is per token, unmasked.

        On stages without ``post_process`` returns the hidden states ``[s, b, h]``.
        """
        inference_context = inference_context if inference_context is not None \
            else inference_params
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids, position_ids)
        rotary_pos_emb = self._rotary(decoder_input, position_ids, inference_context)
        hidden_states = self.decoder(decoder_input, attention_mask,
                                     rotary_pos_emb=rotary_pos_emb,
                                     inference_context=inference_context)
        if not self.post_process:
            return hidden_states
        weight = self.shared_embedding_or_output_weight() \
            if self.share_embeddings_and_output_weights else None
        if labels is None:
            logits, _ = self.output_layer(hidden_states, weight=weight)  # [s, b, V/tp or V]
            return self._logits_for_output(logits)
        # The loss always reads tp-split logits [s, b, V/tp], whatever parallel_output says.
        logits, _ = self.output_layer(hidden_states, weight=weight, runtime_gather_output=False)
        if not self.fp16_lm_cross_entropy:
            logits = logits.float()
        loss = self._language_model_loss(logits, labels)
        if self.mtp is not None:
            loss = self.mtp.attach_loss(
                loss, hidden_states, input_ids, position_ids, labels, loss_mask,
                attention_mask, rotary_pos_emb, embed=self.embedding,
                token_loss=lambda h, target: self._token_loss(h, target, weight))
        return loss

    def _token_loss(self, hidden_states, labels, weight):
        logits, _ = self.output_layer(hidden_states, weight=weight, runtime_gather_output=False)
        if not self.fp16_lm_cross_entropy:
            logits = logits.float()
        return self._language_model_loss(logits, labels)

    def _language_model_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # logits [s, b, V/tp], labels [b, s] -> [s, b]; loss [s, b] -> [b, s]
        target = labels.t().contiguous()
        loss = vocab_parallel_cross_entropy(logits, target, vocab_size=self.vocab_size,
                                            group=self.tp_group)
        return loss.t().contiguous()

    def _rotary(self, decoder_input, position_ids, inference_context):
        if self.rotary_pos_emb is None:
            return None
        if position_ids is not None:
            return self.rotary_pos_emb.for_positions(position_ids)  # [s, b, 1, rot]
        hidden = decoder_input if decoder_input is not None else self.decoder.input_tensor
        seq_len = hidden.size(0)
        if self.config.sequence_parallel and self.tp_size > 1:
            seq_len *= self.tp_size  # [s/tp, b, h] -> attention sees s
        cp_size = dist.get_world_size(self.pg_collection.cp)
        if cp_size > 1:  # context parallelism: angles of this rank's global positions
            positions = get_position_ids_on_cp_rank(seq_len * cp_size, cp_size,
                                                    dist.get_rank(self.pg_collection.cp),
                                                    self.rotary_pos_emb.inv_freq.device)
            return self.rotary_pos_emb.for_positions(positions.unsqueeze(0))  # [s/cp, 1, 1, rot]
        offset = inference_context.sequence_len_offset if inference_context is not None else 0
        return self.rotary_pos_emb(seq_len, offset)  # [s, 1, 1, rot]

    def _logits_for_output(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.transpose(0, 1).contiguous()  # [s, b, V?] -> [b, s, V?]
        if not self.parallel_output:
            return logits[..., :self.vocab_size]
        if self.padded_vocab_size == self.vocab_size:
            return logits
        per_rank = self.padded_vocab_size // self.tp_size
        columns = torch.arange(per_rank, device=logits.device) + self.tp_rank * per_rank
        return logits.masked_fill(columns >= self.vocab_size, float("-inf"))


def _yarn_rotary_embedding(config: TransformerConfig, rotary_percent: float, rotary_base: int,
                           seq_len_interpolation_factor: Optional[float],
                           rope_scaling: bool) -> YarnRotaryEmbedding:
    """YaRN angles of the decoupled rotary part (``config.rope_type == "yarn"``); the
    other position scalings would compound with it, so they are refused by flag."""
    for given, flag in ((rope_scaling, "--use-rope-scaling"),
                        (seq_len_interpolation_factor is not None,
                         "--rotary-seq-len-interpolation-factor"),
                        (rotary_percent != 1.0, "--rotary-percent < 1")):
        if given:
            raise ValueError(f"--rope-type yarn (rope_type='yarn') cannot be combined with "
                             f"{flag}")
    return YarnRotaryEmbedding(
        config.qk_pos_emb_head_dim, config.rotary_interleaved, rotary_base,
        config.rotary_scaling_factor, config.original_max_position_embeddings,
        config.beta_fast, config.beta_slow)
