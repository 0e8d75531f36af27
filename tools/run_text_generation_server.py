#!/usr/bin/env python
"""Serve a megacore GPT checkpoint over HTTP (Megatron's ``PUT /api`` and OpenAI-style
``POST /v1/completions``), in any tensor/pipeline-parallel layout.

    torchrun --nproc-per-node 4 tools/run_text_generation_server.py \\
        --load checkpoints/gpt --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2 --port 5000

Model flags are those of ``examples/pretrain_gpt.py``. ``--load`` may also name a
Megatron-LM checkpoint (legacy or torch_dist; read in memory, model from its ``args``).
A megacore checkpoint stores its
run configuration, so ``--load`` alone is enough: the model shape and tokenizer flags
are read from it (a model flag given on the command line must agree with it). The parallel layout is always
the one given here (default: one rank), whatever layout the checkpoint was saved in.
Training-only flags (``--lr``, ``--train-iters``, data paths) are not needed.

Rank 0 serves on ``--host`` (default 127.0.0.1, this machine only) and ``--port``; the
other ranks follow its batches. Query it with ``tools/text_generation_cli.py``.
"""

import logging
import sys

from megacore.training.cli import run_program
from megacore.training.serving import (  # noqa: F401 - the tool's library API, re-exported
    add_server_args,
    build_controller,
    get_tokenizer,
    parse_serving_args,
    serve,
    server_config,
    service_config,
)
from megacore.training.training import initialize_distributed


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run, args = parse_serving_args(argv)
    initialize_distributed(run.training.distributed_backend,
                           run.training.distributed_timeout_minutes)
    serve(run, args)


if __name__ == "__main__":
    sys.exit(run_program(main))
