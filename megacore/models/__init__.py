"""Models assembled from megacore.transformer: GPT (and shared embeddings)."""

from megacore.models.gpt import GPTModel

__all__ = ["GPTModel"]
