"""Tokenize JSONL text into Megatron .bin/.idx datasets (Megatron's flags).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix out/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 2

writes out/corpus_text_document.bin and .idx (one pair per --json-keys key;
sentence instead of document with --split-sentences).

How it differs from Megatron's tool, on purpose:

* Streaming with bounded memory: the parent reads batches of raw lines (.jsonl,
  .jsonl.gz, a directory of them, or a glob), workers parse and tokenize whole
  batches and send back numpy arrays, and the parent appends them in input order. So the
  output is byte-identical for any --workers (and equal to Megatron's for valid
  input); --partitions is accepted but unnecessary.
* Outputs are written under temporary names and renamed when complete: an interrupted
  or failed run leaves no partial dataset.
* Bad input (malformed JSON, JSON nested too deeply, a missing key, a non-string value,
  invalid UTF-8, a document with no tokens, a line too large for memory, an empty file)
  is reported as file:line: problem and the line is skipped in every output (so
  outputs of several keys stay aligned); --strict stops at the first problem
  instead, writing nothing.
* An output that cannot be written (a read-only directory, a file where a directory
  should be) is one error: line naming the path, before any work; temporary files
  of an earlier run that was killed are removed.
* --split-sentences never downloads: it uses NLTK punkt parameters for --lang
  when they are installed locally, and punkt's untrained defaults otherwise. Sentences
  are split on the fly (no _ss intermediate file, no second run).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megacore.datasets.preprocess import PreprocessConfig, PreprocessError, run
from megacore.tokenizers import TOKENIZER_TYPES


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES,
                       help="tokenizer that turns text into ids")
    group.add_argument("--vocab-file", default=None, help="vocab.json (GPT-2) or vocab.txt")
    group.add_argument("--merge-file", default=None, help="merges.txt (GPT-2)")
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece model, or local tokenizer.json / directory")
    group.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    group.add_argument("--vocab-extra-ids", type=int, default=0,
                       help="sentinel tokens to add (BERT, SentencePiece; default: 0)")
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
    try:
        PreprocessConfig(**vars(args))
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    config = PreprocessConfig(**vars(get_args(argv)))
    try:
        run(config)
    except PreprocessError as err:
        print(f"error: {err}; no output written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
