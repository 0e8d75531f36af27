"""``run``: preprocess a corpus as a :class:`PreprocessConfig` says (workers, order,
outputs)."""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import sys
import time
from typing import Dict, Iterator, Optional

from megacore.datasets.indexed_dataset import (
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)
from megacore.datasets.preprocess.config import PreprocessConfig
from megacore.datasets.preprocess.encoder import DocumentEncoder, EncodedBatch
from megacore.datasets.preprocess.output import check_output_prefix, remove_stale_temporaries
from megacore.datasets.preprocess.problems import PreprocessError, ProblemLog, Progress
from megacore.datasets.preprocess.reader import Batch, expand_inputs, read_batches

_ENCODER: Optional[DocumentEncoder] = None  # the encoder of a worker process


def _init_worker(config: PreprocessConfig) -> None:
    # Forked workers inherit the parent's encoder; only spawned ones build their own.
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = DocumentEncoder(config)


def _encode_in_worker(batch: Batch) -> EncodedBatch:
    return _ENCODER.encode_batch(batch)


def output_prefix(config: PreprocessConfig, key: str) -> str:
    level = "sentence" if config.split_sentences else "document"
    return f"{config.output_prefix}_{key}_{level}"


def encoded_batches(config: PreprocessConfig, encoder: DocumentEncoder,
                    batches: Iterator[Batch]) -> Iterator[EncodedBatch]:
    """Encoded batches in input order, from ``workers`` processes (in-process for 1)."""
    if config.workers == 1:
        for batch in batches:
            yield encoder.encode_batch(batch)
        return
    global _ENCODER
    _ENCODER = encoder
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(config.workers, initializer=_init_worker, initargs=(config,)) as pool:
        # A bounded window of tasks keeps memory flat on inputs of any size while every
        # worker always has queued work.
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 4 * config.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _open_builders(prefixes: Dict[str, str], dtype) -> Dict[str, IndexedDatasetBuilder]:
    builders: Dict[str, IndexedDatasetBuilder] = {}
    try:
        for key, prefix in prefixes.items():
            builders[key] = IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
    except OSError as err:
        for builder in builders.values():
            builder.discard()
        raise PreprocessError(f"{err.filename}: cannot write output ({err.strerror})") from None
    return builders


def run(config: PreprocessConfig, log=None) -> Dict[str, str]:
    """Preprocess as ``config`` says, reporting to ``log`` (default stderr); returns
    ``{key: output prefix}``.

    Raises:
        PreprocessError: fatal input error, an output that cannot be written, a problem
            under ``strict``, or nothing to write. No output file exists afterwards.
    """
    started = time.monotonic()
    log = log or sys.stderr
    paths = expand_inputs(config.input)
    prefixes = {key: output_prefix(config, key) for key in config.json_keys}
    finals = [f(p) for p in prefixes.values() for f in (data_file_path, index_file_path)]
    check_output_prefix(finals)
    remove_stale_temporaries(finals, log)
    encoder = DocumentEncoder(config)
    if config.partitions != 1:
        print(f"note: --partitions {config.partitions} ignored: input is streamed in order, "
              f"so the output is the same without partitions", file=log)
    builders = _open_builders(prefixes, encoder.dtype)
    problems = ProblemLog(config.strict, log)
    print(f"Time to startup: {time.monotonic() - started:.2f}s; opening {len(paths)} input "
          f"file(s): {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}", file=log)
    try:
        progress = _write_all(config, encoder, paths, builders, problems, log)
        if progress.documents == 0:
            raise PreprocessError(f"no documents written: every line of {config.input} was "
                                  f"skipped or the input is empty")
        for key, builder in builders.items():
            builder.finalize(index_file_path(prefixes[key]))
    except OSError as err:  # a full disk, an output renamed into a directory, ...
        for builder in builders.values():
            builder.discard()
        raise PreprocessError(f"{err.filename or config.output_prefix}: cannot write output "
                              f"({err.strerror or err})") from None
    except BaseException:
        for builder in builders.values():
            builder.discard()
        raise
    print(f"Done: {progress.summary()}; skipped {problems.count} bad input line(s) or "
          f"file(s). Wrote {', '.join(p + '.bin/.idx' for p in prefixes.values())}", file=log)
    return prefixes


def _write_all(config, encoder, paths, builders, problems, log) -> Progress:
    progress = Progress(config.log_interval, log)
    remaining = config.max_documents
    stream = encoded_batches(config, encoder, read_batches(paths, problems))
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
