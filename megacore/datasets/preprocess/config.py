"""``PreprocessConfig``: what ``tools/preprocess_data.py``'s flags set (Megatron's names)."""

from __future__ import annotations

import dataclasses
from typing import List, Optional


@dataclasses.dataclass
class PreprocessConfig:
    """One preprocessing run."""

    input: str
    """A JSONL file (``.jsonl``/``.json``, optionally ``.gz``), a directory of them, or a glob."""
    output_prefix: str
    """Outputs are ``{output_prefix}_{key}_{document|sentence}.bin/.idx``."""
    tokenizer_type: str
    """One of :data:`megacore.tokenizers.TOKENIZER_TYPES`."""
    json_keys: List[str] = dataclasses.field(default_factory=lambda: ["text"])
    """Keys of each JSON object to tokenize; one dataset per key."""
    split_sentences: bool = False
    """Split documents into sentences (NLTK punkt, never downloaded)."""
    keep_newlines: bool = False
    """With ``split_sentences``: keep the whitespace after each sentence."""
    vocab_file: Optional[str] = None
    """``vocab.json`` (GPT-2) or ``vocab.txt`` (BERT)."""
    merge_file: Optional[str] = None
    """``merges.txt`` (GPT-2)."""
    tokenizer_model: Optional[str] = None
    """SentencePiece model, or a local ``tokenizer.json`` / directory."""
    vocab_size: Optional[int] = None
    """Vocabulary of ``NullTokenizer``."""
    vocab_extra_ids: int = 0
    """Sentinel tokens to add (BERT, SentencePiece)."""
    append_eod: bool = False
    """Append the end-of-document id to every document."""
    lang: str = "english"
    """punkt language of the sentence splitter."""
    workers: int = 1
    """Tokenizer processes (1: in this process)."""
    partitions: int = 1
    """Accepted for Megatron compatibility; streaming needs none."""
    keep_sequential_samples: bool = False
    """Accepted for Megatron compatibility (order is always kept)."""
    log_interval: int = 1000
    """Report progress every this many documents."""
    max_documents: Optional[int] = None
    """Stop after writing this many documents."""
    strict: bool = False
    """Stop at the first bad input line instead of skipping it."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.keep_newlines and not self.split_sentences:
            raise ValueError("--keep-newlines only applies with --split-sentences")
        if self.log_interval < 1:
            raise ValueError("--log-interval must be at least 1")
