"""Synthetic GPT data for runs and tests without files (``--mock-data``).

The low-level dataset has ``size`` sequences with lengths drawn once from
``numpy.random.default_rng(seed)`` in ``[1, max_sequence_length)``; sequence ``i`` of
length ``n`` is ``1, 2, ..., n-1`` (mod the vocabulary size) followed by the tokenizer's
eod. Same lengths and tokens as Megatron's mock data, so losses are comparable.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from megacore.datasets.gpt_dataset import GPTDataset

__all__ = ["MockGPTDataset", "MockGPTLowLevelDataset"]


class MockGPTLowLevelDataset:
    """Stands in for an ``IndexedDataset``: ``sequence_lengths``, ``get``, ``len``.

    Args:
        tokenizer: supplies ``eod`` and ``vocab_size``.
        seed: seed of the length draw.
        size: number of sequences.
        max_sequence_length: lengths are drawn from ``[1, max_sequence_length)``.
    """

    def __init__(self, tokenizer, seed: int = 0, size: int = 100000,
                 max_sequence_length: int = 4096) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        rng = np.random.default_rng(seed=seed)
        self.sequence_lengths = rng.integers(low=1, high=max_sequence_length, size=size,
                                             dtype=np.int32)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int) -> np.ndarray:
        length = int(self.sequence_lengths[idx])
        body = (np.arange(1, length, dtype=np.int64)) % self.vocab_size
        return np.concatenate([body, np.array([self.eod], dtype=np.int64)])

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx``."""
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        return self[idx][offset:offset + length]


class MockGPTDataset(GPTDataset):
    """A :class:`GPTDataset` over :class:`MockGPTLowLevelDataset`; never cached."""

    @staticmethod
    def build_low_level_dataset(dataset_path: Optional[str], config) -> MockGPTLowLevelDataset:
        """The synthetic sequences for ``config.tokenizer`` (``dataset_path`` is unused)."""
        return MockGPTLowLevelDataset(config.tokenizer)
