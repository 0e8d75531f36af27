"""The training loss of a sequence split over context-parallel ranks.

The per-token loss of a GPT model under cp is ``[b, s/cp]`` on each rank. The loss of the
micro-batch is the masked mean over the *whole* sequence: every rank sums its own
``loss * mask`` and divides by the token count summed over the cp group, so ranks with
more masked-out tokens do not weigh more.

Gradients: each cp rank's backward gives its share of the gradient (ring attention sends
key/value gradients back to their owners), and the shares must be *summed* over cp.
``DistributedDataParallel`` averages over the data-and-context group (dp x cp), so the
loss returned for backward is multiplied by ``cp`` (as Megatron's ``loss_func`` does):
averaging then yields the sum over cp and the mean over dp. The value to report is the
unscaled mean, identical on every cp rank.

Shapes: ``losses``, ``loss_mask`` ``[b, s/cp]``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ["masked_token_mean_over_cp"]


def masked_token_mean_over_cp(losses: torch.Tensor, loss_mask: torch.Tensor,
                              cp_group: dist.ProcessGroup) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked mean of the per-token loss over the full sequence of all cp ranks.

    Args:
        losses: per-token loss ``[b, s/cp]`` of this rank's tokens.
        loss_mask: ``[b, s/cp]``, 1 for tokens that count.
        cp_group: the context-parallel group.

    Returns:
        ``(loss, reported)``: ``loss`` (differentiable) is ``cp * sum(loss * mask) / N``
        with ``N`` the masked token count over cp, for backward under gradient averaging
        over dp x cp; ``reported`` (detached) is the full-sequence mean ``sum / N``, equal
        on every cp rank.
    """
    mask = loss_mask.to(losses.dtype).reshape(-1)
    local_sum = torch.sum(losses.reshape(-1) * mask)
    counts = torch.stack([local_sum.detach(), mask.sum()]).contiguous()  # [2]
    cp_size = dist.get_world_size(cp_group)
    if cp_size > 1:
        dist.all_reduce(counts, group=cp_group)
    total_sum, num_tokens = counts.unbind(0)
    if num_tokens.item() == 0:
        raise ValueError("loss_mask selects no token on any cp rank")
    return local_sum * (cp_size / num_tokens), total_sum / num_tokens
