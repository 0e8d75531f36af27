#!/usr/bin/env python
"""Generate text from a megacore checkpoint, once, from the command line.

    python examples/generate_from_checkpoint.py --load demo_output/checkpoints \\
        --prompt "Return the" --prompt "class Pool" --tokens-to-generate 40

The model shape and tokenizer come from the checkpoint; the layout is the one given here
(default one process), whatever layout it was saved in (torch_dist checkpoints reshard on
load). Greedy decoding unless --temperature > 0. Run it under torchrun with
--tensor-model-parallel-size / --pipeline-model-parallel-size to generate in parallel.
"""

import argparse
import sys

from megacore.inference import GenerationRequest, SamplingParams
from megacore.training.cli import run_program
from megacore.training.serving import build_controller, get_tokenizer, parse_serving_args
from megacore.training.training import initialize_distributed, print_rank_0


def add_generation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", action="append", required=True,
                       help="a prompt (repeat the flag for several; they run as one batch)")
    group.add_argument("--tokens-to-generate", type=int, default=64,
                       help="tokens generated after each prompt (default: 64)")
    group.add_argument("--temperature", type=float, default=0.0,
                       help="sampling temperature; 0 is greedy (default: 0.0)")
    group.add_argument("--top-k", type=int, default=0,
                       help="sample among the k most likely tokens; 0 is off (default: 0)")
    group.add_argument("--top-p", type=float, default=0.0,
                       help="sample within this cumulative probability; 0 is off "
                            "(default: 0.0)")
    group.add_argument("--random-seed", type=int, default=1234,
                       help="seed of the sampling (default: 1234)")
    return parser


def main(argv=None):
    run, generation = parse_serving_args(argv, extra_args_provider=add_generation_args,
                                         description=__doc__.split("\n")[0])
    initialize_distributed(run.training.distributed_backend,
                           run.training.distributed_timeout_minutes)
    controller = build_controller(run, argparse.Namespace(
        max_batch_size=len(generation.prompt), no_kv_cache=False))
    tokenizer = get_tokenizer(run)
    sampling = SamplingParams(temperature=generation.temperature, top_k=generation.top_k,
                              top_p=generation.top_p, seed=generation.random_seed)
    requests = [GenerationRequest(tokenizer.tokenize(p), generation.tokens_to_generate, sampling)
                for p in generation.prompt]
    results = controller.generate(requests)
    texts = []
    for prompt, result in zip(generation.prompt, results):
        text = prompt + tokenizer.detokenize(result.generated_tokens)
        texts.append(text)
        print_rank_0(f"--- prompt: {prompt!r}\n{text}\n")
    return texts


if __name__ == "__main__":
    sys.exit(run_program(main))
