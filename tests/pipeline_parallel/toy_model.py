"""A tiny pipeline-splittable model for schedule tests (no transformer code).

Full model: ``tokens [s, b] -> embedding -> [s, b, h] -> L x (x + gelu(linear(x))) ->
head -> logits [s, b, V] -> cross entropy``. A stage holds a slice of the layers plus the
embedding (``pre_process``, first stage) and/or the head (``post_process``, last stage);
middle stages read their input from ``set_input_tensor``. Stages copy their weights from
one full model built from a seed, so the pipelined run and the single-process reference
start from the same numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from megacore.model_parallel_config import ModelParallelConfig

VOCAB = 11


@dataclasses.dataclass
class ToyConfig(ModelParallelConfig):
    """ModelParallelConfig plus the hidden size the schedules need for tensor shapes."""

    hidden_size: int = 8
    """Width of the activations sent between stages."""


class ToyBlock(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        # Ends with an add: its backward does not need its output (deallocation-safe).
        return x + F.gelu(self.linear(x))


class ToyModel(torch.nn.Module):
    """The unsplit reference: embedding, ``num_layers`` blocks, output head."""

    def __init__(self, config: ToyConfig, num_layers: int, seed: int = 1234):
        super().__init__()
        torch.manual_seed(seed)
        self.config = config
        self.embedding = torch.nn.Embedding(VOCAB, config.hidden_size)
        self.layers = torch.nn.ModuleList(ToyBlock(config.hidden_size) for _ in range(num_layers))
        self.head = torch.nn.Linear(config.hidden_size, VOCAB)

    def forward(self, tokens):
        x = self.embedding(tokens)                      # [s, b] -> [s, b, h]
        for layer in self.layers:
            x = layer(x)
        return self.head(x)                             # [s, b, V]


class ToyStage(torch.nn.Module):
    """Layers ``offset .. offset + count - 1`` of a :class:`ToyModel` (plus ends)."""

    def __init__(self, full: ToyModel, offset: int, count: int, pre_process: bool,
                 post_process: bool):
        super().__init__()
        self.config = full.config
        self.offset, self.pre_process, self.post_process = offset, pre_process, post_process
        self.embedding = copy.deepcopy(full.embedding) if pre_process else None
        self.layers = torch.nn.ModuleList(copy.deepcopy(full.layers[offset + i])
                                          for i in range(count))
        self.head = copy.deepcopy(full.head) if post_process else None
        self.input_tensor: Optional[torch.Tensor] = None

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        self.input_tensor = tensor

    def forward(self, tokens):
        x = self.embedding(tokens) if self.pre_process else self.input_tensor   # [s, b, h]
        for layer in self.layers:
            x = layer(x)
        return self.head(x) if self.post_process else x

    def global_grads(self) -> Dict[str, torch.Tensor]:
        """Gradients keyed by the parameter's name in the full model."""
        out = {}
        for name, param in self.named_parameters():
            if name.startswith("layers."):
                _, index, rest = name.split(".", 2)
                name = f"layers.{int(index) + self.offset}.{rest}"
            out[name] = param.grad.clone()
        return out


def make_batches(num_microbatches: int, seq_length: int, micro_batch_size: int,
                 seed: int = 99, vary_seq: bool = False) -> List[Dict[str, torch.Tensor]]:
    """Token/label micro-batches ``[s, b]``; ``vary_seq`` makes odd ones one token shorter."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(num_microbatches):
        seq = seq_length - (i % 2 if vary_seq else 0)
        batches.append({
            "tokens": torch.randint(0, VOCAB, (seq, micro_batch_size), generator=gen),
            "labels": torch.randint(0, VOCAB, (seq, micro_batch_size), generator=gen)})
    return batches


def loss_func(labels, logits):
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))   # [s*b, V]
    return loss, {"lm loss": loss.detach().clone()}


def forward_step_func(data_iterator, model):
    batch = next(data_iterator)
    return model(batch["tokens"]), functools.partial(loss_func, batch["labels"])


def reference(full: ToyModel, batches) -> tuple:
    """Per-micro-batch losses and gradients of the mean loss, in one process."""
    full.zero_grad()
    losses = []
    for batch in batches:
        loss, _ = loss_func(batch["labels"], full(batch["tokens"]))
        (loss / len(batches)).backward()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in full.named_parameters()}
