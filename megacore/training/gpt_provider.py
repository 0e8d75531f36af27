"""The GPT model and tokenizer of a run: what ``pretrain_gpt.py``, the generation server
and ``generate_from_checkpoint.py`` all build from a :class:`RunConfig`.

``model_provider(run, pre_process, post_process, vp_stage)`` is Megatron's provider
signature, with the parsed run configuration in place of a global ``args``;
``get_tokenizer(run)`` builds the tokenizer the data flags name, and
``model_vocab_size(run)`` is the vocabulary the model is built with: the tokenizer's
size padded by :func:`megacore.vocab_padding.pad_vocab_size` to
``--make-vocab-size-divisible-by``. The tp degree does not enter (GPTModel pads for tp
itself and masks that padding), so a model has the same vocabulary in every layout.
"""

from __future__ import annotations

import functools
from typing import Optional

from megacore.models.gpt import GPTModel, get_gpt_decoder_block_spec
from megacore.tokenizers import MegatronTokenizer, build_tokenizer
from megacore.vocab_padding import pad_vocab_size

__all__ = ["get_tokenizer", "model_vocab_size", "model_provider"]


@functools.lru_cache(maxsize=8)
def _tokenizer(tokenizer_type, vocab_file, merge_file, tokenizer_model, vocab_size,
               tiktoken_pattern):
    # Cached by its files: every pipeline chunk, the dataset builder and the server ask for
    # the same tokenizer, and a BPE or Hugging Face tokenizer takes a while to load.
    return build_tokenizer(tokenizer_type or "NullTokenizer", vocab_file=vocab_file,
                           merge_file=merge_file, tokenizer_model=tokenizer_model,
                           vocab_size=vocab_size, tiktoken_pattern=tiktoken_pattern)


def get_tokenizer(run) -> MegatronTokenizer:
    """The tokenizer of ``run.data`` (``--tokenizer-type`` and its files)."""
    d = run.data
    return _tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file, d.tokenizer_model,
                      d.vocab_size, d.tiktoken_pattern)


def model_vocab_size(run) -> int:
    """The tokenizer's vocabulary rounded up to ``--make-vocab-size-divisible-by``."""
    return pad_vocab_size(get_tokenizer(run).vocab_size, run.gpt.make_vocab_size_divisible_by)


def model_provider(run, pre_process: bool = True, post_process: bool = True,
                   vp_stage: Optional[int] = None) -> GPTModel:
    """This rank's GPT chunk: dense layers, or MoE layers where ``--moe-layer-freq`` says."""
    g = run.gpt
    return GPTModel(run.model, get_gpt_decoder_block_spec(run.model),
                    vocab_size=model_vocab_size(run),
                    max_sequence_length=g.max_position_embeddings,
                    pre_process=pre_process, post_process=post_process,
                    share_embeddings_and_output_weights=not g.untie_embeddings_and_output_weights,
                    position_embedding_type=g.position_embedding_type,
                    rotary_percent=g.rotary_percent, rotary_base=g.rotary_base,
                    rope_scaling=g.use_rope_scaling, rope_scaling_factor=g.rope_scaling_factor,
                    rope_scaling_low_freq_factor=g.rope_scaling_low_freq_factor,
                    rope_scaling_high_freq_factor=g.rope_scaling_high_freq_factor,
                    rope_scaling_original_max_position_embeddings=(
                        g.rope_scaling_original_max_position_embeddings),
                    vp_stage=vp_stage)
