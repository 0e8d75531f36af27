"""Tokenize JSONL text into Megatron ``.bin``/``.idx`` datasets (Megatron's flags).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix out/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 2

writes ``out/corpus_text_document.bin`` and ``.idx`` (one pair per ``--json-keys`` key;
``sentence`` instead of ``document`` with ``--split-sentences``).

How it differs from Megatron's tool, on purpose:

* Streaming with bounded memory: the parent reads batches of raw lines (``.jsonl``,
  ``.jsonl.gz``, a directory of them, or a glob), workers parse and tokenize whole
  batches and send back numpy arrays, and the parent appends them in input order. So the
  output is byte-identical for any ``--workers`` (and equal to Megatron's for valid
  input); ``--partitions`` is accepted but unnecessary.
* Outputs are written under temporary names and renamed when complete: an interrupted
  or failed run leaves no partial dataset.
* Bad input (malformed JSON, a missing key, a non-string value, invalid UTF-8, a
  document with no tokens, an empty file) is reported as ``file:line: problem`` and the
  line is skipped in every output (so outputs of several keys stay aligned); ``--strict``
  stops at the first problem instead, writing nothing.
* ``--split-sentences`` never downloads: it uses NLTK punkt parameters for ``--lang``
  when they are installed locally, and punkt's untrained defaults otherwise. Sentences
  are split on the fly (no ``_ss`` intermediate file, no second run).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megacore.datasets.indexed_dataset import (
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    optimal_dtype,
)
from megacore.tokenizers import TOKENIZER_TYPES, build_tokenizer

# Lines per worker task are capped by bytes so tasks stay similar in cost (load balance)
# and small enough that the last task does not leave one worker idle for long.
_BATCH_BYTES = 128 << 10
_BATCH_LINES = 1024
# Megatron splits texts in slices of this many characters before sentence splitting.
_SENTENCE_SLICE_CHARS = 1_000_000
_MAX_PRINTED_PROBLEMS = 50


class PreprocessError(Exception):
    """A problem that stops the run (fatal input error, or any problem with --strict)."""


# --------------------------------------------------------------------------- flags

def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True,
                       help="JSONL file (.jsonl or .jsonl.gz), a directory of them, or a glob")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys of each JSON object to tokenize; one dataset per key")
    group.add_argument("--split-sentences", action="store_true",
                       help="split documents into sentences (NLTK punkt, offline)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences: keep the whitespace after each sentence")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--vocab-file", default=None, help="vocab.json (GPT-2) or vocab.txt")
    group.add_argument("--merge-file", default=None, help="merges.txt (GPT-2)")
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece model, or local tokenizer.json / directory")
    group.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    group.add_argument("--vocab-extra-ids", type=int, default=0)
    group.add_argument("--append-eod", action="store_true",
                       help="append the end-of-document id to every document")
    group.add_argument("--lang", default="english", help="punkt language for sentences")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="outputs are {prefix}_{key}_{document|sentence}.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, required=True, help="tokenizer processes")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted for Megatron compatibility; streaming needs none")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted for Megatron compatibility (order is always kept)")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="report progress every this many documents")
    group.add_argument("--max-documents", type=int, default=None,
                       help="stop after writing this many documents")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first bad input line instead of skipping it")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.keep_newlines and not args.split_sentences:
        parser.error("--keep-newlines only applies with --split-sentences")
    if args.log_interval < 1:
        parser.error("--log-interval must be at least 1")
    return args


# --------------------------------------------------------------------------- input

def expand_inputs(spec: str) -> List[str]:
    """The input files of ``--input``: a file, a directory's JSONL files, or a glob."""
    if os.path.isdir(spec):
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(spec)
                       for name in names if name.endswith((".jsonl", ".json", ".jsonl.gz",
                                                           ".json.gz")))
        if not paths:
            raise PreprocessError(f"{spec}: directory holds no .jsonl/.json(.gz) files")
        return paths
    if os.path.isfile(spec):
        return [spec]
    paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    if not paths:
        raise PreprocessError(f"{spec}: no such file, directory or glob match")
    return paths


@dataclass
class Batch:
    """Consecutive raw lines of one input file."""

    path: str
    first_line: int  # 1-based line number of lines[0]
    lines: List[bytes]


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_batches(paths: Sequence[str], problems: "ProblemLog") -> Iterator[Batch]:
    """Batches of raw lines, in file and line order; reports empty files."""
    for path in paths:
        lines: List[bytes] = []
        size, first, number = 0, 1, 0
        try:
            with _open_binary(path) as f:
                for number, line in enumerate(f, start=1):
                    lines.append(line)
                    size += len(line)
                    if size >= _BATCH_BYTES or len(lines) >= _BATCH_LINES:
                        yield Batch(path, first, lines)
                        lines, size, first = [], 0, number + 1
        except (OSError, EOFError) as err:  # unreadable file, corrupt or truncated gzip
            raise PreprocessError(f"{path}:{number + 1}: cannot read input ({err})") from err
        if lines:
            yield Batch(path, first, lines)
        if number == 0:
            problems.report(path, 0, "empty input file (no lines)")


# --------------------------------------------------------------------------- workers

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


class DocumentEncoder:
    """Parses JSON lines and tokenizes their keys; one per process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.keys = list(args.json_keys)
        self.append_eod = args.append_eod
        self.tokenizer = build_tokenizer(
            args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
            tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
            vocab_extra_ids=args.vocab_extra_ids)
        self.vocab_size = self.tokenizer.vocab_size
        self.dtype = optimal_dtype(self.vocab_size)
        self.eod = self.tokenizer.eod if args.append_eod else None
        self.splitter = (build_sentence_splitter(args.lang, args.keep_newlines)
                         if args.split_sentences else None)

    def encode_batch(self, batch: Batch) -> EncodedBatch:
        per_key: Dict[str, Tuple[list, list, list]] = {k: ([], [], []) for k in self.keys}
        problems: List[Tuple[int, str]] = []
        documents = 0
        for number, line in enumerate(batch.lines, start=batch.first_line):
            try:
                encoded = self.encode_line(line)
            except ValueError as err:
                problems.append((number, str(err)))
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
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, got a {type(document).__name__}")
    return document


def _concatenate(arrays: List[np.ndarray], dtype) -> np.ndarray:
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(arrays).astype(dtype, copy=False)


def build_sentence_splitter(lang: str, keep_newlines: bool):
    """NLTK punkt for ``lang`` if installed locally, else punkt's untrained defaults.

    With ``keep_newlines`` the whitespace after a sentence end stays on the sentence, so
    joining the sentences gives back the text with its line breaks.
    """
    from nltk.tokenize import punkt

    class WhitespaceKeepingLanguageVars(punkt.PunktLanguageVars):
        # punkt's default pattern consumes the whitespace after a sentence end; matching
        # it inside the sentence (\s*) and looking ahead only at the next token keeps it.
        _period_context_fmt = r"""
            %(SentEndChars)s             # a potential sentence ending
            \s*                          # whitespace stays with the sentence
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or the next token
            ))"""

    lang_vars = WhitespaceKeepingLanguageVars() if keep_newlines else punkt.PunktLanguageVars()
    splitter = punkt.PunktSentenceTokenizer(lang_vars=lang_vars)
    try:
        # Parameters trained for `lang`, only if installed locally (never downloaded).
        splitter._params = punkt.PunktTokenizer(lang)._params
    except (LookupError, OSError, ValueError):
        pass
    return splitter


_ENCODER: Optional[DocumentEncoder] = None


def _init_worker(args: argparse.Namespace) -> None:
    # Forked workers inherit the parent's encoder; only spawned ones build their own.
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = DocumentEncoder(args)


def _encode_in_worker(batch: Batch) -> EncodedBatch:
    return _ENCODER.encode_batch(batch)


# --------------------------------------------------------------------------- parent

class ProblemLog:
    """Collects ``file:line: problem`` reports; with ``strict`` the first one is fatal."""

    def __init__(self, strict: bool, stream) -> None:
        self.strict = strict
        self.stream = stream
        self.count = 0

    def report(self, path: str, line: int, message: str) -> None:
        location = f"{path}:{line}" if line else path
        if self.strict:
            raise PreprocessError(f"{location}: {message} (stopped: --strict)")
        self.count += 1
        if self.count <= _MAX_PRINTED_PROBLEMS:
            print(f"{location}: {message} (skipped)", file=self.stream, flush=True)
        elif self.count == _MAX_PRINTED_PROBLEMS + 1:
            print("... more problems; only the count is reported from here", file=self.stream)


class Progress:
    """Prints ``Processed N documents (docs/s, tokens/s, MB/s)`` every ``interval``."""

    def __init__(self, interval: int, stream) -> None:
        self.interval = interval
        self.stream = stream
        self.start = time.monotonic()
        self.documents = self.tokens = self.bytes = 0
        self._next_report = interval

    def update(self, documents: int, tokens: int, num_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += num_bytes
        # A batch may cross several multiples of the interval: one line for each.
        while self.documents >= self._next_report:
            print(f"Processed {self._next_report} documents ({self._rates()}).",
                  file=self.stream, flush=True)
            self._next_report += self.interval

    def _rates(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (f"{self.documents / elapsed:.1f} docs/s, {self.tokens / elapsed:,.0f} tokens/s, "
                f"{self.bytes / elapsed / 2**20:.2f} MB/s")

    def summary(self) -> str:
        elapsed = time.monotonic() - self.start
        return (f"{self.documents} documents, {self.tokens:,} tokens in {elapsed:.2f}s "
                f"({self._rates()})")


def output_prefix(args: argparse.Namespace, key: str) -> str:
    level = "sentence" if args.split_sentences else "document"
    return f"{args.output_prefix}_{key}_{level}"


def encoded_batches(args: argparse.Namespace, encoder: DocumentEncoder,
                    batches: Iterator[Batch]) -> Iterator[EncodedBatch]:
    """Encoded batches in input order, from ``--workers`` processes (in-process for 1)."""
    if args.workers == 1:
        for batch in batches:
            yield encoder.encode_batch(batch)
        return
    global _ENCODER
    _ENCODER = encoder
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args,)) as pool:
        # A bounded window of tasks keeps memory flat on inputs of any size while every
        # worker always has queued work.
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 4 * args.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def run(args: argparse.Namespace, log=None) -> Dict[str, str]:
    """Preprocess as ``args`` says, reporting to ``log`` (default stderr); returns
    ``{key: output prefix}``.

    Raises:
        PreprocessError: fatal input error, a problem under ``--strict``, or nothing to
            write. No output file exists afterwards in that case.
    """
    started = time.monotonic()
    log = log or sys.stderr
    paths = expand_inputs(args.input)
    encoder = DocumentEncoder(args)
    if args.partitions != 1:
        print(f"note: --partitions {args.partitions} ignored: input is streamed in order, "
              f"so the output is the same without partitions", file=log)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    prefixes = {key: output_prefix(args, key) for key in args.json_keys}
    builders = {key: IndexedDatasetBuilder(data_file_path(p), dtype=encoder.dtype)
                for key, p in prefixes.items()}
    problems = ProblemLog(args.strict, log)
    print(f"Time to startup: {time.monotonic() - started:.2f}s; opening {len(paths)} input "
          f"file(s): {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}", file=log)
    try:
        progress = _write_all(args, encoder, paths, builders, problems, log)
        if progress.documents == 0:
            raise PreprocessError(f"no documents written: every line of {args.input} was "
                                  f"skipped or the input is empty")
        for key, builder in builders.items():
            builder.finalize(index_file_path(prefixes[key]))
    except BaseException:
        for builder in builders.values():
            builder.discard()
        raise
    print(f"Done: {progress.summary()}; skipped {problems.count} bad input line(s) or "
          f"file(s). Wrote {', '.join(p + '.bin/.idx' for p in prefixes.values())}", file=log)
    return prefixes


def _write_all(args, encoder, paths, builders, problems, log) -> Progress:
    progress = Progress(args.log_interval, log)
    remaining = args.max_documents
    stream = encoded_batches(args, encoder, read_batches(paths, problems))
    with contextlib.closing(stream):  # stops the workers at once on errors and limits
        for encoded in stream:
            for line, message in encoded.problems:
                problems.report(encoded.path, line, message)
            take = encoded.num_documents
            if remaining is not None:
                take = min(take, remaining)
                remaining -= take
            tokens = 0
            for key, builder in builders.items():
                ids, lengths, per_doc = _first_documents(encoded, key, take)
                builder.add_documents(ids, lengths, per_doc)
                tokens += len(ids)
            progress.update(take, tokens, encoded.num_bytes)
            if remaining == 0:
                break
    return progress


def _first_documents(encoded: EncodedBatch, key: str, take: int):
    """The first ``take`` documents of a batch for ``key`` (all of them usually)."""
    lengths = encoded.sequence_lengths[key]
    per_doc = encoded.sequences_per_document[key]
    if take == len(per_doc):
        return encoded.tokens[key], lengths, per_doc
    num_sequences = int(per_doc[:take].sum())
    num_tokens = int(lengths[:num_sequences].sum())
    return encoded.tokens[key][:num_tokens], lengths[:num_sequences], per_doc[:take]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args(argv)
    try:
        run(args)
    except PreprocessError as err:
        print(f"error: {err}", file=sys.stderr)
        print("error: no output written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
