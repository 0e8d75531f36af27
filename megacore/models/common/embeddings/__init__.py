"""Embedding modules shared by language models."""

from megacore.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
    padded_vocab_init_method,
    padded_vocab_size,
)

__all__ = ["LanguageModelEmbedding", "padded_vocab_size", "padded_vocab_init_method"]
