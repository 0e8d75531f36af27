"""The ``tools/evaluate.py`` program as library calls: its flags, its dataset, its run.

The program reads a checkpoint like the generation server (``--load`` alone rebuilds the
model and tokenizer; a model flag given as well must agree) and adds the data and batch
flags of :data:`EVALUATION_FLAGS`. ``--eval-split all`` evaluates the whole dataset;
``train``/``valid``/``test`` evaluate that part of ``--split``. Without ``--eval-iters``
every sample is evaluated once; ``--eval-iters N`` evaluates N global batches, as
Megatron's validation does. See :func:`megacore.training.evaluation.evaluate_language_model`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence, Tuple

import torch.distributed as dist

from megacore.datasets import (
    BlendedMegatronDatasetBuilder,
    GPTDataset,
    GPTDatasetConfig,
    get_blend_from_list,
)
from megacore.training import arguments
from megacore.training.evaluation import evaluate_language_model, load_model_for_inference
from megacore.training.gpt_provider import get_tokenizer, model_provider
from megacore.training.serving import SERVING_FLAGS, parse_serving_args
from megacore.training.training import initialize_distributed

__all__ = ["EVALUATION_FLAGS", "SPLITS", "add_evaluation_args", "parse_evaluation_args",
           "build_dataset", "run_evaluation"]

SPLITS = ("all", "train", "valid", "test")

EVALUATION_FLAGS = SERVING_FLAGS + (
    "--context-parallel-size", "--data-path", "--split", "--data-cache-path",
    "--micro-batch-size", "--global-batch-size", "--eval-iters", "--reset-position-ids",
    "--reset-attention-mask", "--eod-mask-loss",
)
"""Run-configuration flags ``tools/evaluate.py`` accepts: the serving ones (checkpoint,
layout, model and tokenizer) plus data, batch and context-parallel flags."""

_DESCRIPTION = ("Perplexity and next-token accuracy of a megacore (or Megatron-LM) checkpoint "
                "on a .bin/.idx dataset, in any tp/pp/cp/dp layout.")


def add_evaluation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The program's own flags."""
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-split", choices=SPLITS, default="all",
                       help="part of --data-path to evaluate: all of it, or one part of "
                            "--split (default: all)")
    group.add_argument("--json-out", help="also write the result to this JSON file")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_evaluation_args(argv: Optional[Sequence[str]] = None
                          ) -> Tuple[arguments.RunConfig, argparse.Namespace, Optional[int]]:
    """``(run, args, eval_iters)``: flags checked against the checkpoint's config;
    ``eval_iters`` is None unless ``--eval-iters`` was given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run, args = parse_serving_args(argv, extra_args_provider=add_evaluation_args,
                                   description=_DESCRIPTION, only=EVALUATION_FLAGS)
    if not run.data.data_path:
        raise SystemExit("--data-path is required: the .bin/.idx dataset prefix to evaluate")
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--eval-iters", type=int)
    eval_iters = probe.parse_known_args(argv)[0].eval_iters
    if eval_iters is not None and eval_iters < 1:
        raise arguments.ArgumentValidationError(
            f"--eval-iters must be >= 1 for evaluation, got {eval_iters}")
    return run, args, eval_iters


def build_dataset(run: arguments.RunConfig, split: str, num_samples: Optional[int]):
    """The GPT dataset of ``split`` (``all``: the whole of --data-path)."""
    d = run.data
    index = 0 if split == "all" else SPLITS.index(split) - 1
    config = GPTDatasetConfig(
        random_seed=run.training.seed, sequence_length=run.gpt.seq_length,
        blend=get_blend_from_list(d.data_path), split="1,0,0" if split == "all" else d.split,
        path_to_cache=d.data_cache_path, tokenizer=get_tokenizer(run),
        reset_position_ids=d.reset_position_ids, reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss, create_attention_mask=d.reset_attention_mask)
    sizes = [0, 0, 0]
    sizes[index] = num_samples
    dataset = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()[index]
    if dataset is None or not len(dataset):
        raise arguments.ArgumentValidationError(
            f"the {split} split of {d.data_path} (--split {d.split}) holds no samples")
    return dataset


def run_evaluation(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse, start the process group, load, evaluate; rank 0 prints the JSON result."""
    run, args, eval_iters = parse_evaluation_args(argv)
    t = run.training
    initialize_distributed(t.distributed_backend, t.distributed_timeout_minutes)
    chunks = load_model_for_inference(run, model_provider)
    dataset = build_dataset(run, args.eval_split,
                            None if eval_iters is None else eval_iters * t.global_batch_size)
    result = evaluate_language_model(
        chunks, dataset, global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size, seq_length=run.gpt.seq_length,
        eval_iters=eval_iters, vocab_size=get_tokenizer(run).vocab_size,
        progress=not args.no_progress).to_dict()
    result.update(checkpoint=run.checkpoint.load, data_path=run.data.data_path,
                  split=args.eval_split, seq_length=run.gpt.seq_length)
    if dist.get_rank() == 0:
        print(json.dumps(result, indent=2))
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
    return result
