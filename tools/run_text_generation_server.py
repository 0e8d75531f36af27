#!/usr/bin/env python
"""Serve a megacore GPT checkpoint over HTTP (Megatron's ``PUT /api`` and OpenAI-style
``POST /v1/completions``), in any tensor/pipeline-parallel layout.

    torchrun --nproc-per-node 4 tools/run_text_generation_server.py \
        --load checkpoints/gpt --tensor-model-parallel-size 2 \
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

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from examples.pretrain_gpt import get_tokenizer, model_provider  # noqa: E402
from megacore.inference import InferenceConfig, TextGenerationController  # noqa: E402
from megacore.inference.generation_service import ServiceConfig  # noqa: E402
from megacore.inference.server import ServerConfig, run_text_generation_server  # noqa: E402
from megacore.training import arguments  # noqa: E402
from megacore.training.training import (  # noqa: E402
    get_model,
    initialize_distributed,
    initialize_model_parallel_from_run,
    load_any_checkpoint,
    print_rank_0,
    saved_run_config,
)

def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("text generation server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to bind (0.0.0.0 exposes the server to the network)")
    group.add_argument("--port", type=int, default=5000, help="TCP port")
    group.add_argument("--max-batch-size", type=int, default=8,
                       help="most sequences generated together (requests are batched)")
    group.add_argument("--max-tokens-to-generate", type=int, default=1024,
                       help="largest tokens_to_generate / max_tokens of one request")
    group.add_argument("--max-request-bytes", type=int, default=1 << 20,
                       help="largest accepted request body (413 beyond)")
    group.add_argument("--max-queued-requests", type=int, default=1024,
                       help="requests waiting beyond this get 503")
    group.add_argument("--batch-wait-ms", type=float, default=2.0,
                       help="wait this long for more requests before starting a batch")
    group.add_argument("--served-model-name", default="megacore-gpt",
                       help="model name of /v1/models and the completions 'model' field")
    group.add_argument("--no-kv-cache", action="store_true",
                       help="recompute the whole sequence each step (debugging only)")
    return parser


def _load_dir(argv) -> str:
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--load")
    return probe.parse_known_args(argv)[0].load


def parse_serving_args(argv=None):
    """``(run, server_args)``: the checkpoint's model and tokenizer settings, checked
    against any model flag given on the command line (a mismatch is an error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        arguments.build_parser(add_server_args).print_help()
        raise SystemExit(0)
    load = _load_dir(argv)
    if not load:
        raise SystemExit("--load is required: the checkpoint to serve")
    run = arguments.parse_args(argv, extra_args_provider=add_server_args,
                               checkpoint_config=saved_run_config(load), checkpoint_path=load,
                               for_inference=True)
    server_args, _ = add_server_args(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    # A one-token decode step cannot be split along the sequence over tp ranks.
    run.model.sequence_parallel = False
    return run, server_args


def build_controller(run, args) -> TextGenerationController:
    """This rank's model chunks with the checkpoint's weights, wrapped for generation."""
    initialize_model_parallel_from_run(run)
    chunks = get_model(model_provider, run, wrap_with_ddp=False)
    load_any_checkpoint(chunks, None, None, load_dir=run.checkpoint.load, no_load_optim=True,
                        no_load_rng=True)
    tokenizer = get_tokenizer(run)
    config = InferenceConfig(max_batch_size=args.max_batch_size,
                             use_kv_cache=not args.no_kv_cache,
                             vocab_size=tokenizer.vocab_size)
    return TextGenerationController(chunks, config, detokenize=tokenizer.detokenize)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    initialize_distributed()
    run, args = parse_serving_args(argv)
    controller = build_controller(run, args)
    print_rank_0(f"serving {run.checkpoint.load} on http://{args.host}:{args.port}")
    run_text_generation_server(
        controller, get_tokenizer(run),
        ServerConfig(host=args.host, port=args.port, max_request_bytes=args.max_request_bytes,
                     max_tokens_to_generate=args.max_tokens_to_generate,
                     model_name=args.served_model_name),
        ServiceConfig(batch_wait_s=args.batch_wait_ms / 1000.0,
                      max_queued_requests=args.max_queued_requests))


if __name__ == "__main__":
    main()
