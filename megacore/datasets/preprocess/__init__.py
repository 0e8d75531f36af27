"""Tokenizing JSONL text into Megatron ``.bin``/``.idx`` datasets: the library behind
``tools/preprocess_data.py`` (and the output checks ``tools/merge_datasets.py`` shares).

The path of one line::

    read_batches (reader.py)      raw lines of .jsonl / .jsonl.gz files, in order
      -> DocumentEncoder (encoder.py)   JSON -> text -> (sentences, sentences.py) -> ids
      -> run (pipeline.py)          workers in order -> IndexedDatasetBuilder -> .bin/.idx

A bad line is a ``file:line: problem`` report (problems.py) and is skipped in every
output, or stops the run under ``strict``. Output problems (an unwritable prefix, a file
where a directory should be) are one :class:`PreprocessError` naming the path, and
temporary files left by a killed earlier run are removed first (output.py).
"""

from megacore.datasets.preprocess.config import PreprocessConfig
from megacore.datasets.preprocess.encoder import DocumentEncoder, EncodedBatch, parse_json_line
from megacore.datasets.preprocess.merge import check_output_outside_inputs, find_prefixes, merge
from megacore.datasets.preprocess.output import (
    check_output_prefix,
    remove_stale_temporaries,
)
from megacore.datasets.preprocess.pipeline import output_prefix, run
from megacore.datasets.preprocess.problems import PreprocessError, ProblemLog, Progress
from megacore.datasets.preprocess.reader import Batch, expand_inputs, read_batches
from megacore.datasets.preprocess.sentences import build_sentence_splitter

__all__ = [
    "Batch",
    "DocumentEncoder",
    "EncodedBatch",
    "PreprocessConfig",
    "PreprocessError",
    "ProblemLog",
    "Progress",
    "build_sentence_splitter",
    "check_output_outside_inputs",
    "check_output_prefix",
    "expand_inputs",
    "find_prefixes",
    "merge",
    "output_prefix",
    "parse_json_line",
    "read_batches",
    "remove_stale_temporaries",
    "run",
]
