#!/usr/bin/env python
"""megacore's building blocks in your own training loop (no pretrain(), no flags).

    torchrun --nproc-per-node 2 examples/run_simple_train_loop.py      # tp=2 on gloo/CPU

Builds a small GPT split over tensor-parallel ranks, wraps it in DDP, and trains it on a
synthetic next-token task with the schedule, optimizer and gradient finalization that
pretrain() uses. Swap any piece for your own.
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacore import device, parallel_state  # noqa: E402
from megacore.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec  # noqa: E402
from megacore.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megacore.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megacore.tensor_parallel import model_parallel_manual_seed  # noqa: E402
from megacore.transformer import TransformerConfig  # noqa: E402

SEQ, MBS, VOCAB, STEPS = 32, 4, 128, 30


def initialize(tp: int) -> bool:
    """Join (or create) the process group; True when this program created it."""
    created = not dist.is_initialized()  # else already joined (e.g. a test harness)
    if not created:
        pass
    elif "RANK" in os.environ:
        dist.init_process_group(device.default_backend())
    else:  # plain `python run_simple_train_loop.py`: a world of one, rendezvous via a file
        store = os.path.join(tempfile.mkdtemp(prefix="megacore-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
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
    config.finalize_model_grads_func = finalize_model_grads
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


def main() -> list:
    owns_process_group = initialize(tp=2)
    model = build_model()
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=3e-3, weight_decay=0.0), [model])
    model.config.grad_scale_func = optimizer.scale_loss
    model.config.no_sync_func = model.no_sync
    forward_backward = get_forward_backward_func()
    data = synthetic_batches()
    history = []
    for step in range(1, STEPS + 1):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(forward_step_func=forward_step, data_iterator=data,
                                  model=model, num_microbatches=2, seq_length=SEQ,
                                  micro_batch_size=MBS, forward_only=False)
        _, grad_norm, _ = optimizer.step()
        loss = sum(float(item["lm loss"]) for item in losses) / len(losses)
        history.append(loss)
        if step % 5 == 0 and dist.get_rank() == 0:
            print(f"step {step:3d} | loss {loss:.4f} | grad norm {float(grad_norm):.3f}")
    parallel_state.destroy_model_parallel()
    if owns_process_group:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
