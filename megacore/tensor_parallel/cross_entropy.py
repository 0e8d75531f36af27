"""Cross entropy over logits whose vocabulary dim is split over tensor-parallel ranks.

Each rank holds ``logits[..., v/tp]``. The loss needs three reductions over tp: the max
logit (for a stable softmax), the target's logit (held by exactly one rank), and the sum of
exponentials; nothing of size ``v`` is ever gathered.

For target t and shifted logits z (``z = logits - max``)::

    loss = log(sum_j exp(z_j)) - z_t

Label smoothing follows Megatron-Core: with ``eps = label_smoothing * V / (V - 1)``,
``loss = (1 - eps) * loss - eps * mean_j log p_j``; this equals
``torch.nn.functional.cross_entropy(..., label_smoothing=eps)``.

Padded vocabularies: ``vocab_size`` (the number of real classes) makes columns at and
beyond it padding. They get zero probability and no gradient, so a model whose vocabulary
was padded to a multiple of tp computes the loss of the unpadded model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore import parallel_state

__all__ = ["vocab_parallel_cross_entropy", "VocabUtility"]


class VocabUtility:
    """Which slice ``[first, last)`` of the vocabulary a tp rank holds."""

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(per_partition_vocab_size: int, rank: int,
                                                  world_size: int):
        first = rank * per_partition_vocab_size
        return first, first + per_partition_vocab_size

    @staticmethod
    def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int, world_size: int):
        if global_vocab_size % world_size:
            raise ValueError(f"vocabulary size {global_vocab_size} is not divisible by the "
                             f"tensor-parallel size {world_size}")
        return VocabUtility.vocab_range_from_per_partition_vocab_size(
            global_vocab_size // world_size, rank, world_size)


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing, vocab_size, group):
        # logits [s, b, v/tp] (any leading dims), target [s, b]
        tp_rank, tp_size = dist.get_rank(group), dist.get_world_size(group)
        per_partition = logits.size(-1)
        first, last = VocabUtility.vocab_range_from_per_partition_vocab_size(
            per_partition, tp_rank, tp_size)
        total_vocab = per_partition * tp_size
        vocab_size = total_vocab if vocab_size is None else vocab_size
        logits = logits.float()
        padding = None
        if vocab_size < total_vocab:
            columns = torch.arange(first, last, device=logits.device)
            padding = columns >= vocab_size  # [v/tp]
            logits = logits.masked_fill(padding, float("-inf"))

        logits_max = _all_reduce(logits.max(dim=-1)[0], dist.ReduceOp.MAX, group)
        shifted = logits - logits_max.unsqueeze(-1)

        outside = (target < first) | (target >= last)
        local_target = (target - first).masked_fill(outside, 0)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        predicted = _all_reduce(predicted.masked_fill(outside, 0.0).contiguous(),
                                dist.ReduceOp.SUM, group)

        # Without label smoothing ``shifted`` is not needed again: exponentiate in place,
        # so the step holds one [.., v/tp] float32 buffer fewer at its peak.
        exp_logits = shifted.exp() if label_smoothing > 0 else shifted.exp_()
        sum_exp = _all_reduce(exp_logits.sum(dim=-1), dist.ReduceOp.SUM, group)
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - predicted
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))

        eps = 0.0
        if label_smoothing > 0:
            if vocab_size < 2:
                raise ValueError("label smoothing needs at least two classes")
            eps = label_smoothing * vocab_size / (vocab_size - 1)
            log_probs = shifted - log_sum_exp.unsqueeze(-1)
            if padding is not None:
                log_probs = log_probs.masked_fill(padding, 0.0)
            mean_log_probs = _all_reduce(log_probs.sum(dim=-1), dist.ReduceOp.SUM,
                                         group) / vocab_size
            loss = (1.0 - eps) * loss - eps * mean_log_probs

        ctx.eps, ctx.vocab_size = eps, vocab_size
        ctx.save_for_backward(softmax, outside, local_target,
                              padding if padding is not None else torch.empty(0))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, outside, local_target, padding = ctx.saved_tensors
        grad = softmax  # reuse the buffer: d loss / d z = p - onehot(target)
        onehot = torch.zeros_like(grad).scatter_(-1, local_target.unsqueeze(-1), 1.0)
        onehot.masked_fill_(outside.unsqueeze(-1), 0.0)
        if ctx.eps > 0:
            # loss = (1-eps) * nll - eps * mean log p  ->  grad = p - (1-eps) onehot - eps/V
            grad = grad - (1.0 - ctx.eps) * onehot - ctx.eps / ctx.vocab_size
            if padding.numel():
                grad = grad.masked_fill(padding, 0.0)
        else:
            grad = grad - onehot
        return grad * grad_output.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0, *,
                                 vocab_size: Optional[int] = None,
                                 group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token cross entropy from tp-split logits.

    Args:
        vocab_parallel_logits: ``[s, b, v/tp]`` this rank's slice of the logits.
        target: ``[s, b]`` class ids in ``[0, vocab_size)``.
        label_smoothing: Megatron-Core's smoothing (see the module docstring).
        vocab_size: number of real classes when the vocabulary is padded (default: all).
        group: tensor-parallel group (default from :mod:`megacore.parallel_state`).

    Returns:
        ``[s, b]`` float32 loss per token (not reduced).
    """
    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    classes = vocab_parallel_logits.size(-1)
    if dist.get_world_size(group) == 1 and (vocab_size is None or vocab_size == classes):
        # Nothing is split: the same function through torch's fused kernel, ~10% of a CPU
        # training step faster at vocab 4096 (benchmarks/bench_gpt_step.py).
        eps = label_smoothing * classes / (classes - 1) if label_smoothing > 0 else 0.0
        return F.cross_entropy(vocab_parallel_logits.float().reshape(-1, classes),
                               target.reshape(-1), reduction="none",
                               label_smoothing=eps).view(target.shape)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, label_smoothing,
                                            vocab_size, group)
