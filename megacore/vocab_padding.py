"""The one rule for padding a vocabulary: round up to a multiple.

Two callers need it, with different multiples:

* the run's vocabulary (``--make-vocab-size-divisible-by``): the tokenizer's size rounded
  up to ``make_vocab_size_divisible_by`` so the embedding table is a friendly size. In
  megacore the tp degree does *not* enter here (unlike Megatron's
  ``_vocab_size_with_padding``), so a model has the same vocabulary, the same
  parameters and the same loss in every layout;
* the model's table split over tp ranks: ``GPTModel`` pads that vocabulary further to a
  multiple of tp, and masks the extra rows out of the softmax, so they never change a
  loss.

Megatron's combined rule is ``pad_vocab_size(v, divisible_by, tp)``. Example: GPT-2's
50257 tokens with ``make_vocab_size_divisible_by=128`` pad to 50304 (393 * 128); with
tp=2 Megatron's rule gives 50432 (197 * 256).

This module imports nothing, so every layer may use it.
"""

from __future__ import annotations

__all__ = ["pad_vocab_size"]


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 1,
                   tensor_model_parallel_size: int = 1) -> int:
    """``vocab_size`` rounded up to a multiple of ``make_vocab_size_divisible_by *
    tensor_model_parallel_size``.

    Raises:
        ValueError: a non-positive multiple or a negative ``vocab_size``.
    """
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    if multiple <= 0:
        raise ValueError(f"make_vocab_size_divisible_by * tensor_model_parallel_size must be "
                         f"positive, got {make_vocab_size_divisible_by} * "
                         f"{tensor_model_parallel_size}")
    if vocab_size < 0:
        raise ValueError(f"vocab_size must be >= 0, got {vocab_size}")
    return -(-vocab_size // multiple) * multiple
