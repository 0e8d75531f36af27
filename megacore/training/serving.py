"""Serving a checkpoint: the flags, the model and the controller behind the generation
server (``tools/run_text_generation_server.py``) and ``generate_from_checkpoint.py``.

A megacore checkpoint stores its run configuration, so ``--load`` alone rebuilds the
model and its tokenizer; a model or tokenizer flag given as well must agree with the
checkpoint. The parallel layout is the one given here (default: one rank), whatever
layout the checkpoint was saved in. Training flags (``--lr``, data paths, ...) are not
accepted: the serving parser holds only :data:`SERVING_FLAGS` and the server's own flags.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence, Tuple

import torch.distributed as dist

from megacore.inference import InferenceConfig, TextGenerationController
from megacore.inference.generation_service import ServiceConfig
from megacore.inference.server import ServerConfig, run_text_generation_server
from megacore.training import arguments
from megacore.training.evaluation import load_model_for_inference
from megacore.training.gpt_provider import get_tokenizer, model_provider
from megacore.training.training import saved_run_config

__all__ = ["SERVING_FLAGS", "add_server_args", "build_serving_parser", "parse_serving_args",
           "build_controller", "server_config", "service_config", "get_tokenizer", "serve"]

SERVING_FLAGS = (
    "--load", "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
    "--num-virtual-stages-per-pipeline-rank", "--num-layers-per-virtual-pipeline-stage",
    "--expert-model-parallel-size",
    "--expert-tensor-parallel-size", "--distributed-backend", "--distributed-timeout-minutes",
    "--seed", "--seq-length", "--bf16", "--fp16",
) + arguments.CHECKPOINT_MODEL_FLAGS
"""Run-configuration flags the server accepts: the checkpoint, the parallel layout, and
the model/tokenizer flags a checkpoint saves (each must agree with the checkpoint)."""


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The generation server's own flags (host, port, batching and limits)."""
    group = parser.add_argument_group("text generation server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to bind; 0.0.0.0 exposes the server to the network "
                            "(default: 127.0.0.1, this machine only)")
    group.add_argument("--port", type=int, default=5000, help="TCP port (default: 5000)")
    group.add_argument("--max-batch-size", type=int, default=8,
                       help="most sequences generated together; requests are batched "
                            "(default: 8)")
    group.add_argument("--max-tokens-to-generate", type=int, default=1024,
                       help="largest tokens_to_generate / max_tokens of one request "
                            "(default: 1024)")
    group.add_argument("--max-request-bytes", type=int, default=1 << 20,
                       help="largest accepted request body; 413 beyond (default: 1048576)")
    group.add_argument("--max-queued-requests", type=int, default=1024,
                       help="requests waiting beyond this get 503 (default: 1024)")
    group.add_argument("--max-concurrent-requests", type=int, default=64,
                       help="generation requests in progress at once (a stream until it "
                            "ends); more get 503; 0: no limit (default: 64)")
    group.add_argument("--request-read-timeout", type=float, default=30.0,
                       help="seconds a request body may take to arrive; 408 beyond "
                            "(default: 30.0)")
    group.add_argument("--batch-wait-ms", type=float, default=2.0,
                       help="wait this long for more requests before starting a batch "
                            "(default: 2.0)")
    group.add_argument("--served-model-name", default="megacore-gpt",
                       help="model name of /v1/models and of the completions 'model' field "
                            "(default: megacore-gpt)")
    group.add_argument("--no-kv-cache", action="store_true",
                       help="recompute the whole sequence at each step (debugging only)")
    return parser


def build_serving_parser(extra_args_provider=add_server_args,
                         description: str = "Serve a megacore GPT checkpoint over HTTP.",
                         only: Sequence[str] = SERVING_FLAGS) -> argparse.ArgumentParser:
    """The serving parser: the run-configuration flags ``only`` (default
    :data:`SERVING_FLAGS`) plus ``extra_args_provider``'s flags."""
    return arguments.build_parser(extra_args_provider, only=only, description=description)


def parse_serving_args(argv: Optional[Sequence[str]] = None, *,
                       extra_args_provider=add_server_args,
                       description: str = "Serve a megacore GPT checkpoint over HTTP.",
                       only: Sequence[str] = SERVING_FLAGS,
                       ) -> Tuple[arguments.RunConfig, argparse.Namespace]:
    """``(run, program_args)``: the checkpoint's model and tokenizer settings, checked
    against any model flag given on the command line (a mismatch is an error), and the
    flags ``extra_args_provider`` added (the server's by default). ``only``: the
    run-configuration flags the program accepts (another program reading a checkpoint,
    such as ``tools/evaluate.py``, adds its data flags).

    Raises:
        SystemExit: ``--help``, an unknown flag, or no ``--load`` (argparse's message).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_serving_parser(extra_args_provider, description, only)
    parser.parse_args(argv)  # rejects training-only flags, answers --help
    flags = arguments.read_flag_values(argv, extra_args_provider=extra_args_provider)
    load = flags.values.get("load")  # from the command line or --yaml-cfg
    if not load:
        parser.error("--load is required: the checkpoint directory to generate from")
    run = arguments.run_config_from_flags(flags, world_size=_world_size(),
                                          checkpoint_config=saved_run_config(load),
                                          checkpoint_path=load, for_inference=True)
    # A one-token decode step cannot be split along the sequence over tp ranks.
    run.model.sequence_parallel = False
    program, _ = extra_args_provider(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    return run, program


def _world_size() -> int:
    # The layout is checked before the process group exists (so that --help and a bad
    # flag answer at once): the launcher's WORLD_SIZE says how many ranks there will be.
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_controller(run: arguments.RunConfig, args: argparse.Namespace
                     ) -> TextGenerationController:
    """This rank's model chunks with the checkpoint's weights, wrapped for generation.

    ``args`` needs ``max_batch_size`` and ``no_kv_cache`` (the server's flags).
    """
    chunks = load_model_for_inference(run, model_provider)
    tokenizer = get_tokenizer(run)
    config = InferenceConfig(max_batch_size=args.max_batch_size,
                             use_kv_cache=not args.no_kv_cache,
                             vocab_size=tokenizer.vocab_size)
    return TextGenerationController(chunks, config, detokenize=tokenizer.detokenize)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The HTTP settings of the server's flags."""
    return ServerConfig(host=args.host, port=args.port,
                        max_request_bytes=args.max_request_bytes,
                        max_tokens_to_generate=args.max_tokens_to_generate,
                        model_name=args.served_model_name,
                        max_concurrent_requests=args.max_concurrent_requests,
                        request_read_timeout_s=args.request_read_timeout)


def service_config(args: argparse.Namespace) -> ServiceConfig:
    """The batching settings of the server's flags."""
    return ServiceConfig(batch_wait_s=args.batch_wait_ms / 1000.0,
                         max_queued_requests=args.max_queued_requests)


def serve(run: arguments.RunConfig, args: argparse.Namespace) -> None:
    """Load the checkpoint and serve it: rank 0 answers HTTP, the other ranks follow its
    batches, until rank 0 is interrupted (Ctrl-C, SIGINT).

    torchrun passes a Ctrl-C on to every rank. The followers ignore it: they stop when
    rank 0's server, shutting down, sends them its stop command, so no rank leaves in
    the middle of a collective and the others see no "connection closed" errors.
    """
    controller = build_controller(run, args)
    if dist.get_rank() != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_text_generation_server(controller, get_tokenizer(run), server_config(args),
                               service_config(args))
