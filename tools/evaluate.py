#!/usr/bin/env python
"""Perplexity and next-token accuracy of a megacore checkpoint on a ``.bin/.idx`` dataset,
in any tensor/pipeline/context/data-parallel layout.

    torchrun --nproc-per-node 2 tools/evaluate.py --load checkpoints/gpt \
        --data-path data/my_text_document --tensor-model-parallel-size 2 \
        --seq-length 1024 --micro-batch-size 4 --global-batch-size 32 --json-out ppl.json

Model and tokenizer flags come from the checkpoint (as for the generation server); the
layout is the one given here. ``--eval-split all`` (the default) evaluates the whole
dataset; ``train``/``valid``/``test`` evaluate that part of ``--split``. Without
``--eval-iters`` every sample of the split is evaluated once; ``--eval-iters N``
evaluates N global batches, as Megatron's validation does. The result (loss in nats per
token, perplexity, accuracy, token and sample counts) is printed as JSON and written to
``--json-out``. See ``megacore.training.evaluation_program``.
"""

import sys

from megacore.training.cli import run_program
from megacore.training.evaluation_program import (  # noqa: F401 - the tool's library API
    SPLITS,
    add_evaluation_args,
    build_dataset,
    parse_evaluation_args,
    run_evaluation,
)


def main(argv=None) -> dict:
    return run_evaluation(argv)


if __name__ == "__main__":
    sys.exit(run_program(main))
