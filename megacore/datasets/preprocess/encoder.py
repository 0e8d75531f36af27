"""One JSONL line to token ids: ``parse_json_line`` and ``DocumentEncoder``.

Every failure of one line, whatever raised it (malformed JSON, a missing key, JSON
nested deeper than the parser's recursion limit, a line too large for memory, a
tokenizer error), becomes a ``(line number, problem)`` entry of the batch: the caller
reports it as ``file:line: problem`` and skips the line in every output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from megacore.datasets.indexed_dataset import optimal_dtype
from megacore.datasets.preprocess.reader import Batch
from megacore.datasets.preprocess.sentences import build_sentence_splitter
from megacore.tokenizers import build_tokenizer

# Megatron splits texts in slices of this many characters before sentence splitting.
_SENTENCE_SLICE_CHARS = 1_000_000


@dataclass
class EncodedBatch:
    """What a worker sends back: per key, all ids of the batch's good documents."""

    path: str
    tokens: Dict[str, np.ndarray]
    sequence_lengths: Dict[str, np.ndarray]
    sequences_per_document: Dict[str, np.ndarray]
    num_documents: int
    num_bytes: int
    problems: List[Tuple[int, str]] = field(default_factory=list)


def parse_json_line(line: bytes) -> dict:
    """One JSONL line as a dict; ``ValueError`` names invalid UTF-8 or malformed JSON."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"invalid UTF-8 at byte {err.start} ({err.reason})") from None
    text = text.rstrip("\r\n")  # the line break is not part of the JSON value
    if not text.strip():
        raise ValueError("blank line (expected a JSON object)")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse (RecursionError)") from None
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, got a {type(document).__name__}")
    return document


def line_problem(err: BaseException, line: bytes) -> str:
    """What went wrong with one line, for its ``file:line: problem`` report."""
    if isinstance(err, ValueError):
        return str(err)
    if isinstance(err, RecursionError):
        return f"nested too deeply to process (RecursionError: {err})"
    if isinstance(err, MemoryError):
        return f"out of memory while encoding this line ({len(line):,} bytes; MemoryError)"
    return f"cannot encode this line ({type(err).__name__}: {err})"


class DocumentEncoder:
    """Parses JSON lines and tokenizes their keys; one per process.

    Args:
        config: a :class:`~megacore.datasets.preprocess.PreprocessConfig` (or anything
            with its tokenizer, key and sentence fields).
    """

    def __init__(self, config) -> None:
        self.keys = list(config.json_keys)
        self.tokenizer = build_tokenizer(
            config.tokenizer_type, vocab_file=config.vocab_file, merge_file=config.merge_file,
            tokenizer_model=config.tokenizer_model, vocab_size=config.vocab_size,
            vocab_extra_ids=config.vocab_extra_ids)
        self.vocab_size = self.tokenizer.vocab_size
        self.dtype = optimal_dtype(self.vocab_size)
        self.eod: Optional[int] = self.tokenizer.eod if config.append_eod else None
        self.splitter = (build_sentence_splitter(config.lang, config.keep_newlines)
                         if config.split_sentences else None)

    def encode_batch(self, batch: Batch) -> EncodedBatch:
        per_key: Dict[str, Tuple[list, list, list]] = {k: ([], [], []) for k in self.keys}
        problems: List[Tuple[int, str]] = []
        documents = 0
        for number, line in enumerate(batch.lines, start=batch.first_line):
            try:
                encoded = self.encode_line(line)
            except Exception as err:  # noqa: BLE001 - one bad line never stops the run
                problems.append((number, line_problem(err, line)))
                continue
            documents += 1
            for key, (ids, lengths) in encoded.items():
                tokens, seq_lengths, seq_counts = per_key[key]
                tokens.append(ids)
                seq_lengths.extend(lengths)
                seq_counts.append(len(lengths))
        return EncodedBatch(
            path=batch.path,
            tokens={k: _concatenate(v[0], self.dtype) for k, v in per_key.items()},
            sequence_lengths={k: np.array(v[1], dtype=np.int32) for k, v in per_key.items()},
            sequences_per_document={k: np.array(v[2], dtype=np.int64)
                                    for k, v in per_key.items()},
            num_documents=documents, num_bytes=sum(len(x) for x in batch.lines),
            problems=problems)

    def encode_line(self, line: bytes) -> Dict[str, Tuple[np.ndarray, List[int]]]:
        """``{key: (ids, sequence lengths)}`` of one line; ``ValueError`` says what is
        wrong with it."""
        document = parse_json_line(line)
        encoded = {}
        for key in self.keys:
            if key not in document:
                present = ", ".join(repr(k) for k in list(document)[:5]) or "none"
                raise ValueError(f"missing key {key!r} (keys present: {present})")
            encoded[key] = self.encode_text(key, document[key])
        return encoded

    def encode_text(self, key: str, value) -> Tuple[np.ndarray, List[int]]:
        pieces, lengths = [], []
        for sentence in self._sentences(key, value):
            ids = self.tokenizer.tokenize(sentence)
            if ids:  # Megatron never writes zero-length sequences
                pieces.append(np.array(ids, dtype=np.int64))
                lengths.append(len(ids))
        if not lengths:
            raise ValueError(f"empty document: key {key!r} gives no tokens")
        if self.eod is not None:
            # The eod id joins the last sequence rather than forming its own (Megatron).
            pieces.append(np.array([self.eod], dtype=np.int64))
            lengths[-1] += 1
        ids = np.concatenate(pieces)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"key {key!r}: token id {int(ids.max())} outside the vocabulary "
                             f"(size {self.vocab_size})")
        return ids, lengths

    def _sentences(self, key: str, value) -> List[str]:
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value  # already split (Megatron's _ss intermediate format)
        if not isinstance(value, str):
            raise ValueError(f"key {key!r} holds a {type(value).__name__}, expected a string")
        if self.splitter is None:
            return [value]
        return [sentence for start in range(0, len(value), _SENTENCE_SLICE_CHARS)
                for sentence in self.splitter.tokenize(value[start:start + _SENTENCE_SLICE_CHARS])]


def _concatenate(arrays: List[np.ndarray], dtype) -> np.ndarray:
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(arrays).astype(dtype, copy=False)
