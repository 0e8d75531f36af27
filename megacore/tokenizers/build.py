"""``build_tokenizer``: a tokenizer from Megatron's flag names, with the padded vocab size.

Megatron pads the embedding table so its rows split evenly over tensor-parallel ranks
and stay a GPU-friendly multiple: ``padded = ceil(vocab / (divisible_by * tp)) *
divisible_by * tp``. Example: GPT-2's 50257 tokens with ``make_vocab_size_divisible_by=128``
and tp=2 pad to 50432 (197 * 256). The tokenizer itself is unchanged; the padded size is
stored on it as ``padded_vocab_size`` for the model to read.
"""

from __future__ import annotations

import logging
from typing import Optional

from megacore.deprecation import deprecated
from megacore.tokenizers.bert_wordpiece import BertWordPieceTokenizer
from megacore.tokenizers.gpt2_bpe import GPT2BPETokenizer
from megacore.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer
from megacore.tokenizers.megatron_tokenizer import MegatronTokenizer
from megacore.tokenizers.null_tokenizer import NullTokenizer
from megacore.tokenizers.sentencepiece_tokenizer import (
    GPTSentencePieceTokenizer,
    Llama2Tokenizer,
    SentencePieceTokenizer,
)
from megacore.tokenizers.tiktoken_tokenizer import TikTokenizer
from megacore.vocab_padding import pad_vocab_size

__all__ = ["TOKENIZER_TYPES", "build_tokenizer", "vocab_size_with_padding"]

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)


@deprecated(since="0.2.0", removed_in="0.4.0", alternative="megacore.vocab_padding.pad_vocab_size")
def vocab_size_with_padding(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                            tensor_model_parallel_size: int = 1) -> int:
    """``vocab_size`` rounded up to a multiple of ``divisible_by * tp``."""
    return pad_vocab_size(vocab_size, make_vocab_size_divisible_by, tensor_model_parallel_size)


def build_tokenizer(tokenizer_type: str, *, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None, vocab_extra_ids: int = 0,
                    make_vocab_size_divisible_by: int = 128,
                    tensor_model_parallel_size: int = 1,
                    tiktoken_pattern: Optional[str] = None) -> MegatronTokenizer:
    """Build the tokenizer named by ``--tokenizer-type`` from its local files.

    Args:
        tokenizer_type: one of :data:`TOKENIZER_TYPES`.
        vocab_file: ``vocab.json`` (GPT-2) or ``vocab.txt`` (BERT).
        merge_file: ``merges.txt`` (GPT-2).
        tokenizer_model: SentencePiece ``.model``, or a local ``tokenizer.json``/directory.
        vocab_size: data vocabulary of ``NullTokenizer``; total ids of ``TikTokenizer``.
        vocab_extra_ids: sentinel tokens to add (BERT, SentencePiece).
        make_vocab_size_divisible_by: padding granularity of the embedding table.
        tensor_model_parallel_size: tp degree; the padding multiple is scaled by it.
        tiktoken_pattern: ``v1``/``v2`` split regex of ``TikTokenizer`` (default v2).

    Returns:
        The tokenizer, with ``padded_vocab_size`` set.

    Raises:
        ValueError: unknown type, or a file flag the type needs is missing.
    """
    if tokenizer_type == "TikTokenizer":
        tokenizer = TikTokenizer(_require(tokenizer_model, "--tokenizer-model", tokenizer_type),
                                 pattern=tiktoken_pattern or "v2", vocab_size=vocab_size)
    else:
        tokenizer = _construct(tokenizer_type, vocab_file, merge_file, tokenizer_model,
                               vocab_size, vocab_extra_ids)
    padded = pad_vocab_size(tokenizer.vocab_size, make_vocab_size_divisible_by,
                            tensor_model_parallel_size)
    logger.info("padded vocab (size: %d) with %d dummy tokens (new size: %d)",
                tokenizer.vocab_size, padded - tokenizer.vocab_size, padded)
    tokenizer.padded_vocab_size = padded
    return tokenizer


def _require(value, flag: str, tokenizer_type: str):
    if value is None:
        raise ValueError(f"{tokenizer_type} needs {flag}")
    return value


def _construct(tokenizer_type, vocab_file, merge_file, tokenizer_model, vocab_size,
               vocab_extra_ids) -> MegatronTokenizer:
    t = tokenizer_type
    if t == "GPT2BPETokenizer":
        return GPT2BPETokenizer(_require(vocab_file, "--vocab-file", t),
                                _require(merge_file, "--merge-file", t))
    if t in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        return BertWordPieceTokenizer(_require(vocab_file, "--vocab-file", t),
                                      lower_case=t == "BertWordPieceLowerCase",
                                      vocab_extra_ids=vocab_extra_ids)
    if t == "SentencePieceTokenizer":
        return SentencePieceTokenizer(_require(tokenizer_model, "--tokenizer-model", t),
                                      vocab_extra_ids=vocab_extra_ids)
    if t == "GPTSentencePieceTokenizer":
        return GPTSentencePieceTokenizer(_require(tokenizer_model, "--tokenizer-model", t))
    if t == "Llama2Tokenizer":
        return Llama2Tokenizer(_require(tokenizer_model, "--tokenizer-model", t))
    if t == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(_require(tokenizer_model, "--tokenizer-model", t))
    if t == "NullTokenizer":
        return NullTokenizer(_require(vocab_size, "--vocab-size", t))
    raise ValueError(f"unknown tokenizer type {t!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
