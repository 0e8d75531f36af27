"""Building blocks shared by the models (embeddings)."""

from megacore.models.common.embeddings import LanguageModelEmbedding

__all__ = ["LanguageModelEmbedding"]
