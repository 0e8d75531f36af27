"""GPT pre-training samples: fixed-length windows over a shuffled stream of documents.

How a split becomes samples (the order is Megatron-Core 0.16's, so a data path, split,
seed and sequence length give the same samples in both libraries):

1. The split's sequence ids are repeated for as many epochs as the requested number of
   samples needs and shuffled with ``numpy.random.RandomState(random_seed)``: the
   *document index*. When the last epoch is needed for less than 80% of its samples it is
   shuffled separately and appended, so the partial epoch is not mixed into the others.
2. The document index is read as one flat token stream cut into windows of
   ``sequence_length + 1`` tokens that overlap by one (the label shift): the *sample
   index* (:func:`megacore.datasets.helpers.build_sample_idx`).
3. The samples are permuted by the same RandomState: the *shuffle index* (the samples of
   a separated last epoch are permuted among themselves).

Sample ``i`` is window ``shuffle_index[i]``, returned as ``tokens`` (first ``s`` tokens),
``labels`` (last ``s``), ``loss_mask``, ``position_ids`` and optionally
``attention_mask``, all ``[s]`` (``[1, s, s]`` for the mask; True = masked out).
The three indices are cached on disk (:mod:`megacore.datasets.index_cache`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from megacore.datasets.blended_megatron_dataset_config import (
    BlendedMegatronDatasetConfig,
)
from megacore.datasets.helpers import build_sample_idx, num_samples_in_stream
from megacore.datasets.index_cache import IndexCache, distributed_rank
from megacore.datasets.indexed_dataset import IndexedDataset
from megacore.datasets.split_and_blend import Split

__all__ = [
    "GPTDataset",
    "GPTDatasetConfig",
    "build_document_index",
    "build_shuffle_index",
    "get_ltor_masks_and_position_ids",
    "num_epochs_needed",
]

logger = logging.getLogger(__name__)

# Label/token value for padding when the tokenizer has no pad id distinct from eod.
_NO_PAD_ID = -1
# A final epoch supplying fewer than this fraction of an epoch's samples is shuffled apart.
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


@dataclass
class GPTDatasetConfig(BlendedMegatronDatasetConfig):
    """:class:`BlendedMegatronDatasetConfig` plus how GPT samples are assembled."""

    reset_position_ids: bool = False
    """Restart position ids after every end-of-document token (documents packed into one
    sample then each start at position 0)."""

    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens (needs ``create_attention_mask``)."""

    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""

    create_attention_mask: bool = True
    """Return a ``[1, s, s]`` causal ``attention_mask``; turn off when the attention kernel
    builds its own causal mask (saves s^2 memory per sample)."""

    drop_last_partial_validation_sequence: bool = True
    """Drop the validation split's final partial sample (else it is padded)."""

    add_extra_token_to_sequence: bool = True
    """Read ``sequence_length + 1`` tokens per sample so labels are the next tokens. Off:
    read ``sequence_length`` and label the last position with padding."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokenizer is None:
            raise ValueError("GPTDatasetConfig needs a tokenizer (for its eod id)")
        if self.reset_attention_mask and not self.create_attention_mask:
            raise ValueError("reset_attention_mask needs create_attention_mask")


def num_epochs_needed(tokens_per_epoch: int, num_samples: Optional[int], sequence_length: int,
                      extra: int) -> int:
    """Smallest epoch count whose tokens cover ``num_samples`` windows (1 if None)."""
    if num_samples is None:
        return 1
    needed = num_samples * sequence_length + extra
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int,
                         random_state: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """``documents`` repeated ``num_epochs`` times and shuffled (int32); with
    ``separate_final_epoch`` the last epoch is shuffled on its own and appended."""
    if separate_final_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, random_state, False)
        last = build_document_index(documents, 1, random_state, False)
        return np.concatenate((first, last))
    index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    random_state.shuffle(index)
    return index


def build_shuffle_index(num_samples: int, total_size: int,
                        random_state: np.random.RandomState) -> np.ndarray:
    """A permutation of ``[0, total_size)`` that keeps ``[0, num_samples)`` and
    ``[num_samples, total_size)`` apart (uint32, int64 for huge sizes)."""
    dtype = np.int64 if total_size >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(num_samples, dtype=dtype)
    random_state.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    random_state.shuffle(last)
    return np.concatenate((first, last))


def get_ltor_masks_and_position_ids(tokens: torch.Tensor, eod: int, reset_position_ids: bool,
                                    reset_attention_mask: bool, eod_mask_loss: bool,
                                    create_attention_mask: bool):
    """Left-to-right masks for one sample ``tokens`` ``[s]``.

    Returns:
        ``(attention_mask [1, s, s] bool (True = masked) or None, loss_mask [s] float,
        position_ids [s] long)``.
    """
    s = tokens.numel()
    loss_mask = torch.ones(s, dtype=torch.float)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long)
    attention_mask = (torch.tril(torch.ones((s, s))).unsqueeze(0)
                      if create_attention_mask else None)
    if reset_position_ids or reset_attention_mask:
        previous_start = 0
        for eod_position in (tokens == eod).nonzero().flatten().tolist():
            start = eod_position + 1  # the next document starts after the eod token
            if reset_attention_mask and attention_mask is not None:
                attention_mask[0, start:, :start] = 0
            if reset_position_ids:
                position_ids[start:] -= start - previous_start
                previous_start = start
    if attention_mask is not None:
        attention_mask = attention_mask < 0.5
    return attention_mask, loss_mask, position_ids


class GPTDataset(torch.utils.data.Dataset):
    """One split of one indexed dataset, as GPT samples.

    Args:
        indexed_dataset: an ``IndexedDataset`` (or the mock low-level dataset).
        dataset_path: its path prefix (``None`` for mock data); part of the cache key.
        indexed_indices: the split's sequence ids (int32), from ``--split``.
        num_samples: samples wanted; ``None`` means exactly one epoch.
        index_split: which split this is.
        config: the dataset configuration.

    Raises:
        ValueError: the split holds no tokens.
    """

    def __init__(self, indexed_dataset, dataset_path: Optional[str],
                 indexed_indices: np.ndarray, num_samples: Optional[int], index_split: Split,
                 config: GPTDatasetConfig) -> None:
        self.dataset = indexed_dataset
        self.dataset_path = dataset_path
        self.indices = np.asarray(indexed_indices, dtype=np.int32)
        self.num_samples = num_samples
        self.index_split = index_split
        self.config = config
        self._extra = int(config.add_extra_token_to_sequence)
        self._eod = config.tokenizer.eod
        self._pad = self._pad_id(config.tokenizer)
        self.unique_description = self._describe()
        self.built_anew_on_cache_miss = False
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build()
        self._cached_masks = None

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig) -> IndexedDataset:
        """The indexed dataset at ``dataset_path`` (ids checked against the tokenizer's
        vocabulary as they are read)."""
        vocab_size = getattr(config.tokenizer, "vocab_size", None)
        return IndexedDataset(dataset_path, mmap=config.mmap_bin_files,
                              vocab_size=vocab_size if isinstance(vocab_size, int) else None)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset) -> int:
        """What ``--split`` divides: the number of sequences."""
        return len(low_level_dataset.sequence_lengths)

    def _pad_id(self, tokenizer) -> int:
        try:
            pad = tokenizer.pad
        except (NotImplementedError, AttributeError):
            return _NO_PAD_ID
        # A pad equal to eod would mask every real end-of-document label as padding.
        return _NO_PAD_ID if pad is None or pad == self._eod else pad

    def _describe(self) -> str:
        config = self.config
        identity = {
            "class": type(self).__name__,
            "dataset_path": self.dataset_path,
            "num_samples": self.num_samples,
            "index_split": self.index_split.name,
            "random_seed": config.random_seed,
            "sequence_length": config.sequence_length,
            "split": config.split,
            "split_matrix": config.split_matrix,
            "add_extra_token_to_sequence": config.add_extra_token_to_sequence,
            "drop_last_partial_validation_sequence":
                config.drop_last_partial_validation_sequence,
            "tokenizer": getattr(config.tokenizer, "unique_identifiers", None),
            # Regenerated data under the same prefix must not reuse the old indices.
            "num_sequences": len(self.dataset.sequence_lengths),
            "split_sequences": [int(self.indices[0]), int(self.indices[-1]) + 1]
            if len(self.indices) else [0, 0],
            "data_bytes": _data_file_size(self.dataset_path),
        }
        return json.dumps(identity, indent=4)

    def _cache(self) -> Optional[IndexCache]:
        directory = self.config.path_to_cache
        if directory is None and (self.config.mock or self.dataset_path is None):
            return None
        if directory is None:
            directory = os.path.join(os.path.dirname(os.path.abspath(self.dataset_path)),
                                     "cache", f"{type(self).__name__}_indices")
        return IndexCache(directory, self.unique_description, type(self).__name__,
                          self.index_split.name)

    def _load_or_build(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        names = ("document_index", "sample_index", "shuffle_index")
        cache = self._cache()
        if cache is not None and cache.is_complete():
            logger.info("loading %s %s indices from %s", type(self).__name__,
                        self.index_split.name, cache.directory)
            arrays = cache.load(names)
            return tuple(arrays[n] for n in names)
        rank = distributed_rank()
        if cache is not None and rank not in (None, 0):
            raise RuntimeError(
                f"rank {rank}: index cache {cache.path('description.txt')} is missing after "
                f"rank 0 built it; path_to_cache must be a directory all ranks share")
        started = time.monotonic()
        arrays = self._build_indices()
        self.built_anew_on_cache_miss = True
        if cache is not None:
            cache.save(dict(zip(names, arrays)))
        logger.info("built %s %s indices (%d samples) in %.2fs", type(self).__name__,
                    self.index_split.name, len(arrays[1]) - 1, time.monotonic() - started)
        return arrays

    def _build_indices(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        config, extra = self.config, self._extra
        lengths = np.asarray(self.dataset.sequence_lengths)
        tokens_per_epoch = int(lengths[self.indices].sum(dtype=np.int64))
        if tokens_per_epoch <= extra:
            raise ValueError(f"the {self.index_split.name} split of {self.dataset_path} holds "
                             f"{tokens_per_epoch} tokens: not enough for one sample")
        num_epochs = num_epochs_needed(tokens_per_epoch, self.num_samples,
                                       config.sequence_length, extra)
        separate_final_epoch, samples_before_final = self._separate_final_epoch(
            tokens_per_epoch, num_epochs)
        random_state = np.random.RandomState(config.random_seed)
        document_index = build_document_index(self.indices, num_epochs, random_state,
                                              separate_final_epoch)
        drop_last = (config.drop_last_partial_validation_sequence
                     if self.index_split == Split.valid else True)
        # A dense walk over a memory-mapped lengths array is faster from memory.
        sizes = np.array(lengths, dtype=np.int32) if len(document_index) * 2 > len(lengths) \
            else lengths
        sample_index = build_sample_idx(sizes, document_index, config.sequence_length,
                                        num_epochs, tokens_per_epoch, drop_last, extra)
        total = sample_index.shape[0] - 1
        shuffle_index = build_shuffle_index(
            samples_before_final if separate_final_epoch else total, total, random_state)
        return document_index, sample_index, shuffle_index

    def _separate_final_epoch(self, tokens_per_epoch: int, num_epochs: int) -> Tuple[bool, int]:
        if num_epochs == 1:
            return False, 0
        length, extra = self.config.sequence_length, self._extra
        before_final = num_samples_in_stream((num_epochs - 1) * tokens_per_epoch, length,
                                             extra, True)
        from_final = self.num_samples - before_final
        per_epoch = num_samples_in_stream(tokens_per_epoch, length, extra, True)
        return from_final < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch), before_final

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        """Sample ``idx``; ``None`` gives a sample whose loss mask is all zero (batch
        padding)."""
        text = torch.from_numpy(self._sample_tokens(0 if idx is None else int(idx)))
        if self._extra:
            tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        else:
            tokens = text
            labels = torch.roll(text, shifts=-1)
            labels[-1] = self._pad
        attention_mask, loss_mask, position_ids = self._masks(tokens)
        padding = labels == self._pad
        loss_mask = loss_mask.masked_fill(padding, 0.0)
        # Padding ids (-1 without a pad token) must still index the embedding table.
        tokens = tokens.masked_fill(tokens == self._pad, 0)
        labels = labels.masked_fill(padding, 0)
        if idx is None:
            loss_mask = torch.zeros_like(loss_mask)
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                  "position_ids": position_ids}
        if attention_mask is not None:
            sample["attention_mask"] = attention_mask
        return sample

    def _masks(self, tokens: torch.Tensor):
        config = self.config
        data_dependent = config.reset_position_ids or config.reset_attention_mask \
            or config.eod_mask_loss
        if not data_dependent and self._cached_masks is not None:
            return self._cached_masks  # callers never modify them in place
        masks = get_ltor_masks_and_position_ids(
            tokens, self._eod, config.reset_position_ids, config.reset_attention_mask,
            config.eod_mask_loss, config.create_attention_mask)
        if not data_dependent:
            self._cached_masks = masks
        return masks

    def _sample_tokens(self, idx: int) -> np.ndarray:
        """The ``sequence_length + extra`` token ids of sample ``idx`` (int64), padded."""
        window = int(self.shuffle_index[idx])
        first_doc, first_offset = (int(v) for v in self.sample_index[window])
        last_doc, last_offset = (int(v) for v in self.sample_index[window + 1])
        parts = []
        for position in range(first_doc, last_doc + 1):
            offset = first_offset if position == first_doc else 0
            length = (last_offset + self._extra - offset) if position == last_doc else None
            parts.append(self.dataset.get(int(self.document_index[position]), offset=offset,
                                          length=length))
        wanted = self.config.sequence_length + self._extra
        have = sum(len(p) for p in parts)
        if have < wanted:
            parts.append(np.full(wanted - have, self._pad, dtype=np.int64))
        return np.concatenate(parts).astype(np.int64)


def _data_file_size(dataset_path: Optional[str]) -> Optional[int]:
    if dataset_path is None:
        return None
    try:
        return os.path.getsize(dataset_path + ".bin")
    except OSError:
        return None
