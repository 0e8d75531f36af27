"""Perplexity and next-token accuracy of a language model over a dataset, in any layout.

:func:`evaluate_language_model` runs the model chunks of this rank forward over GPT
samples (``tokens``/``labels``/``loss_mask``/``position_ids``, as ``GPTDataset``
gives them) with the pipeline schedule of the current grid, and sums over every
unmasked label position::

    nll      = sum of -log softmax(logits)[label]     (natural log)
    correct  = number of positions where argmax(logits) == label
    tokens   = number of positions

    loss = nll / tokens,  perplexity = exp(loss),  accuracy = correct / tokens

Every layout computes the same sums: tensor parallelism splits the vocabulary (the cross
entropy and the argmax are vocab-parallel: each rank's best column, then the best of the
ranks, the lowest column winning ties as ``torch.argmax`` does), context parallelism
splits each sequence, data parallelism splits each global batch (sums are all-reduced
over data x context ranks), and the last pipeline stage broadcasts the totals to the
others, so every rank returns the same :class:`EvaluationResult`.

Which samples (Megatron's ``--eval-iters`` semantics where they apply):

* ``eval_iters=N``: N global batches, the first ``N * global_batch_size`` samples of a
  dataset built with that many samples (more than an epoch wraps, as in Megatron);
* ``eval_iters=None``: exactly one pass over the dataset (one epoch); the last global
  batch is completed with samples whose loss mask is zero, so every token counts once.

Logit columns at or beyond ``vocab_size`` (vocabulary padding, e.g.
``--make-vocab-size-divisible-by``) are excluded from the softmax and the argmax, so an
imported model gives the perplexity its original implementation gives.

Shapes: ``b`` micro-batch, ``s`` sequence (``s/cp`` per context rank), ``V/tp``
vocabulary columns of this tensor-parallel rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore import device, parallel_state
from megacore.checkpointing.conversion.model_description import ACTIVATIONS, CONVERSION_SECTION
from megacore.checkpointing.conversion.streaming import Progress
from megacore.pipeline_parallel import get_forward_backward_func
from megacore.tensor_parallel import vocab_parallel_cross_entropy
from megacore.training.training import (
    get_model,
    initialize_model_parallel_from_run,
    load_any_checkpoint,
    saved_run_config,
)
from megacore.transformer.context_parallel import get_batch_on_this_cp_rank

__all__ = ["EvaluationResult", "evaluate_language_model", "evaluation_sample_indices",
           "load_model_for_inference"]


@dataclasses.dataclass
class EvaluationResult:
    """Totals of one evaluation (the same on every rank)."""

    loss: float
    """Mean negative log-likelihood per token, in nats."""

    perplexity: float
    """``exp(loss)``."""

    accuracy: float
    """Fraction of tokens where the most likely next token is the label."""

    tokens: int
    """Label positions counted (loss mask 1)."""

    samples: int
    """Real samples evaluated (padding samples excluded)."""

    iterations: int
    """Global batches run."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def load_model_for_inference(run, model_provider) -> List[torch.nn.Module]:
    """This rank's model chunks (eval mode) with the weights of ``run.checkpoint.load``
    (collective over the grid ``run`` describes, which this call initializes).

    A checkpoint imported from Hugging Face records its activation in the converter's
    section of its config (Megatron's flags cannot say e.g. GPT-2's tanh GeLU); that
    activation is used.
    """
    load = run.checkpoint.load
    converted = (saved_run_config(load) or {}).get(CONVERSION_SECTION) or {}
    if converted.get("activation") in ACTIVATIONS:
        run.model.activation_func = ACTIVATIONS[converted["activation"]]
    initialize_model_parallel_from_run(run)
    chunks = get_model(model_provider, run, wrap_with_ddp=False)
    # A megacore checkpoint, or a Megatron-LM one read in memory through the converter.
    load_any_checkpoint(chunks, None, None, load_dir=load, no_load_optim=True,
                        no_load_rng=True)
    return [chunk.eval() for chunk in chunks]


def evaluation_sample_indices(num_samples: int, global_batch_size: int,
                              eval_iters: Optional[int]) -> List[List[Optional[int]]]:
    """Sample indices of each global batch; ``None`` pads the last batch of a full pass.

    >>> evaluation_sample_indices(5, 2, None)
    [[0, 1], [2, 3], [4, None]]
    >>> evaluation_sample_indices(5, 2, 1)
    [[0, 1]]
    """
    if eval_iters is not None:
        count = eval_iters * global_batch_size
        if count > num_samples:
            raise ValueError(f"eval_iters {eval_iters} x global batch {global_batch_size} = "
                             f"{count} samples, but the dataset holds {num_samples}")
        indices: List[Optional[int]] = list(range(count))
    else:
        indices = list(range(num_samples))
        indices += [None] * (-len(indices) % global_batch_size)
    return [indices[i:i + global_batch_size]
            for i in range(0, len(indices), global_batch_size)]


def _micro_batches(dataset, batches: List[List[Optional[int]]], micro_batch_size: int,
                   dp_rank: int, dp_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches: its contiguous share of each global batch
    (as Megatron's pretraining sampler slices it)."""
    for batch in batches:
        share = len(batch) // dp_size
        mine = batch[dp_rank * share:(dp_rank + 1) * share]
        for start in range(0, share, micro_batch_size):
            samples = [dataset[i] for i in mine[start:start + micro_batch_size]]
            yield torch.utils.data.default_collate(samples)


def _get_batch(data_iterator):
    """Tokens for the first stage, labels and loss mask for the last (this cp rank's
    part of the sequence); middle stages read nothing."""
    if not (parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()):
        return None, None, None, None, None
    batch = {k: v.to(device.current_device()) if torch.is_tensor(v) else v
             for k, v in next(data_iterator).items()}
    batch = get_batch_on_this_cp_rank(batch, parallel_state.get_context_parallel_world_size(),
                                      parallel_state.get_context_parallel_rank())
    return (batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("attention_mask"),
            batch["position_ids"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "parallel_output") and hasattr(model, "module"):
        model = model.module
    return model


def _column_offset(logits: torch.Tensor, split: bool) -> int:
    if not split:
        return 0
    return parallel_state.get_tensor_model_parallel_rank() * logits.size(-1)


def _argmax(logits: torch.Tensor, offset: int, group) -> torch.Tensor:
    """Global argmax ``[b, s]`` of vocab-split logits ``[b, s, V/tp]``."""
    values, index = logits.max(dim=-1)                                   # [b, s]
    index = index + offset
    if group is None or dist.get_world_size(group) == 1:
        return index
    size = dist.get_world_size(group)
    all_values = [torch.empty_like(values) for _ in range(size)]
    all_index = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_index, index.contiguous(), group=group)
    # [tp, b, s] -> [1, b, s]: the first maximum, i.e. the lowest rank on ties
    best = torch.stack(all_values).argmax(dim=0, keepdim=True)
    return torch.stack(all_index).gather(0, best).squeeze(0)            # [tp, b, s] -> [b, s]


def _token_statistics(vocab_size: Optional[int], split: bool, labels: torch.Tensor,
                      loss_mask: torch.Tensor, logits: torch.Tensor):
    """Last stage: ``(nll sum, {"sums": [nll, correct, tokens]})`` of one micro-batch."""
    group = parallel_state.get_tensor_model_parallel_group() if split else None
    logits = logits.float()                                             # [b, s, V/tp]
    offset = _column_offset(logits, split)
    if vocab_size is not None:
        columns = torch.arange(logits.size(-1), device=logits.device) + offset
        logits = logits.masked_fill(columns >= vocab_size, float("-inf"))
    if split:
        nll = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                           labels.t().contiguous(), group=group).t()  # [b, s]
    else:
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                              reduction="none").view(labels.shape)
    correct = (_argmax(logits, offset, group) == labels).float()
    mask = loss_mask.float()
    sums = torch.stack([(nll * mask).sum(), (correct * mask).sum(), mask.sum()]).double()
    return sums[0], {"sums": sums}


def _forward_step(vocab_size: Optional[int], data_iterator, model):
    tokens, labels, loss_mask, attention_mask, position_ids = _get_batch(data_iterator)
    output = model(tokens, position_ids, attention_mask)  # last stage: logits [b, s, V/tp]
    split = bool(getattr(_unwrap(model), "parallel_output", True)) and \
        parallel_state.get_tensor_model_parallel_world_size() > 1
    return output, functools.partial(_token_statistics, vocab_size, split, labels, loss_mask)


def _reduce_totals(losses: Sequence[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """``[nll, correct, tokens]`` summed over micro-batches, data and context ranks, on
    every pipeline stage."""
    totals = torch.zeros(3, dtype=torch.float64, device=device.current_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            totals += item["sums"].to(totals.device)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(
            with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # The loss stage: the last rank, or the first under ZBV's V.
        src = (parallel_state.get_pipeline_model_parallel_first_rank()
               if parallel_state.is_virtual_pipeline_v_shape()
               else parallel_state.get_pipeline_model_parallel_last_rank())
        dist.broadcast(totals, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    return totals


def evaluate_language_model(model_chunks: Sequence[torch.nn.Module], dataset, *,
                            global_batch_size: int, micro_batch_size: int, seq_length: int,
                            eval_iters: Optional[int] = None,
                            vocab_size: Optional[int] = None,
                            progress: bool = True) -> EvaluationResult:
    """Perplexity and accuracy of ``model_chunks`` on ``dataset`` (collective call).

    Args:
        model_chunks: this rank's chunks (one per virtual pipeline stage), returning
            logits when called without labels.
        dataset: indexable samples; ``dataset[None]`` must be a sample with a zero loss
            mask (``GPTDataset`` does this), used to complete the last global batch.
        global_batch_size: samples per iteration (a multiple of micro batch x dp).
        micro_batch_size: samples per forward.
        seq_length: tokens per sample (``s``).
        eval_iters: global batches to run (None: one full pass, see the module docstring).
        vocab_size: real vocabulary; logit columns beyond it are ignored.
        progress: a progress bar on stderr (global rank 0).
    """
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    if global_batch_size % (micro_batch_size * dp):
        raise ValueError(f"global batch size {global_batch_size} is not a multiple of micro "
                         f"batch size {micro_batch_size} x data-parallel size {dp}")
    batches = evaluation_sample_indices(len(dataset), global_batch_size, eval_iters)
    num_microbatches = global_batch_size // (micro_batch_size * dp)
    chunks = list(model_chunks)
    iterators = [_micro_batches(dataset, batches, micro_batch_size, dp_rank, dp)
                 for _ in chunks]  # every virtual stage reads its own copy
    schedule = get_forward_backward_func()
    bar = Progress(len(batches), "evaluating", enabled=progress and dist.get_rank() == 0)
    losses: List[Dict[str, torch.Tensor]] = []
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        for _ in batches:
            losses += schedule(forward_step_func=functools.partial(_forward_step, vocab_size),
                               data_iterator=iterators if len(chunks) > 1 else iterators[0],
                               model=chunks if len(chunks) > 1 else chunks[0],
                               num_microbatches=num_microbatches, seq_length=seq_length,
                               micro_batch_size=micro_batch_size, forward_only=True)
            bar.update()
    bar.close()
    nll, correct, tokens = (float(v) for v in _reduce_totals(losses))
    if tokens == 0:
        raise ValueError("no label position was evaluated (every loss mask is zero)")
    loss = nll / tokens
    samples = sum(i is not None for batch in batches for i in batch)
    return EvaluationResult(loss=loss, perplexity=math.exp(loss), accuracy=correct / tokens,
                            tokens=int(tokens), samples=samples, iterations=len(batches))
