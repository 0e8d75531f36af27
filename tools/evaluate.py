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
``--json-out``. See ``megacore.training.evaluation``.
"""

import argparse
import json
import os
import sys

import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from examples.pretrain_gpt import get_tokenizer, model_provider  # noqa: E402
from megacore.datasets import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
    GPTDataset,
    GPTDatasetConfig,
    get_blend_from_list,
)
from megacore.training import arguments  # noqa: E402
from megacore.training.evaluation import (  # noqa: E402
    evaluate_language_model,
    load_model_for_inference,
)
from megacore.training.training import initialize_distributed, saved_run_config  # noqa: E402

SPLITS = ("all", "train", "valid", "test")


def add_evaluation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-split", choices=SPLITS, default="all",
                       help="part of --data-path to evaluate: all of it, or one part of "
                       "--split")
    group.add_argument("--json-out", help="write the result to this JSON file")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _probe(argv):
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--load")
    probe.add_argument("--eval-iters", type=int)
    return probe.parse_known_args(argv)[0]


def parse_evaluation_args(argv=None):
    """``(run, args, eval_iters)``: flags checked against the checkpoint's config;
    ``eval_iters`` is None unless ``--eval-iters`` was given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        arguments.build_parser(add_evaluation_args).print_help()
        raise SystemExit(0)
    probe = _probe(argv)
    if not probe.load:
        raise SystemExit("--load is required: the checkpoint to evaluate")
    run = arguments.parse_args(argv, extra_args_provider=add_evaluation_args,
                               checkpoint_config=saved_run_config(probe.load),
                               checkpoint_path=probe.load, for_inference=True)
    if not run.data.data_path:
        raise SystemExit("--data-path is required: the .bin/.idx dataset prefix to evaluate")
    if probe.eval_iters is not None and probe.eval_iters < 1:
        raise SystemExit(f"--eval-iters must be >= 1 for evaluation, got {probe.eval_iters}")
    args, _ = add_evaluation_args(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    return run, args, probe.eval_iters


def build_dataset(run, split: str, num_samples):
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
        raise SystemExit(f"the {split} split of {d.data_path} (--split {d.split}) holds no "
                         "samples")
    return dataset


def main(argv=None) -> dict:
    initialize_distributed()
    run, args, eval_iters = parse_evaluation_args(argv)
    chunks = load_model_for_inference(run, model_provider)
    t = run.training
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


if __name__ == "__main__":
    main()
