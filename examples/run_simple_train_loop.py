#!/usr/bin/env python
"""megacore's building blocks in your own training loop (no pretrain(), no Megatron flags).

    torchrun --nproc-per-node 2 examples/run_simple_train_loop.py      # tp=2 on gloo/CPU

Builds a small GPT split over tensor-parallel ranks, wraps it in DDP, and trains it on a
synthetic next-token task with the schedule, optimizer and gradient finalization that
pretrain() uses. Swap any piece for your own.
"""

import argparse

import torch
import torch.distributed as dist

from megacore import device, parallel_state
from megacore.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    build_training_hooks,
)
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec
from megacore.optimizer import OptimizerConfig, get_megatron_optimizer
from megacore.pipeline_parallel import get_forward_backward_func
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.training import initialize_distributed
from megacore.transformer import TransformerConfig

SEQ, MBS, VOCAB, STEPS = 32, 4, 128, 30


def initialize(tp: int) -> bool:
    """Join (or create) the process group; True when this program created it."""
    created = initialize_distributed()  # torchrun's group, or a world of one via a file
    tp = min(tp, dist.get_world_size())
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_manual_seed(123)
    return created


def build_model() -> DistributedDataParallel:
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size())
    gpt = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                   share_embeddings_and_output_weights=True)
    return DistributedDataParallel(config, DistributedDataParallelConfig(), gpt)


def synthetic_batches():
    """Sequences that count up modulo the vocabulary: learnable in a few steps."""
    generator = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
    while True:
        start = torch.randint(0, VOCAB, (MBS, 1), generator=generator)
        tokens = (start + torch.arange(SEQ + 1)) % VOCAB
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
               "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}


def forward_step(data_iterator, model):
    batch = {k: v.to(device.current_device()) for k, v in next(data_iterator).items()}
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach()}

    return losses, loss_func


def main(tp: int = 2, steps: int = STEPS) -> list:
    owns_process_group = initialize(tp)
    model = build_model()
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=3e-3, weight_decay=0.0), [model])
    # DDP's no_sync and gradient finalization, the optimizer's loss scaling.
    hooks = build_training_hooks(model, optimizer)
    forward_backward = get_forward_backward_func()
    data = synthetic_batches()
    history = []
    for step in range(1, steps + 1):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(forward_step_func=forward_step, data_iterator=data,
                                  model=model, num_microbatches=2, seq_length=SEQ,
                                  micro_batch_size=MBS, forward_only=False, hooks=hooks)
        _, grad_norm, _ = optimizer.step()
        loss = sum(float(item["lm loss"]) for item in losses) / len(losses)
        history.append(loss)
        if step % 5 == 0 and dist.get_rank() == 0:
            print(f"step {step:3d} | loss {loss:.4f} | grad norm {float(grad_norm):.3f}")
    parallel_state.destroy_model_parallel()
    if owns_process_group:
        dist.destroy_process_group()
    return history


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=2,
                        help="tp degree, capped at the number of ranks (default: 2)")
    parser.add_argument("--train-iters", type=int, default=STEPS,
                        help=f"training steps (default: {STEPS})")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    main(args.tensor_model_parallel_size, args.train_iters)
