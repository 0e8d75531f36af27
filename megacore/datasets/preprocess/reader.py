"""The input side: which files ``--input`` names, and their raw lines in batches."""

from __future__ import annotations

import glob
import gzip
import os
from dataclasses import dataclass
from typing import Iterator, List, Sequence

from megacore.datasets.preprocess.problems import PreprocessError, ProblemLog

# Lines per worker task are capped by bytes so tasks stay similar in cost (load balance)
# and small enough that the last task does not leave one worker idle for long.
_BATCH_BYTES = 128 << 10
_BATCH_LINES = 1024
_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def expand_inputs(spec: str) -> List[str]:
    """The input files of ``--input``: a file, a directory's JSONL files, or a glob."""
    if os.path.isdir(spec):
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(spec)
                       for name in names if name.endswith(_SUFFIXES))
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


def read_batches(paths: Sequence[str], problems: ProblemLog) -> Iterator[Batch]:
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
