"""``finalize_model_grads``: everything that must happen to grads between the last
backward and the optimizer step.

1. Finish the data-parallel reduction of every model chunk (DDP buckets; FSDP2 chunks
   reduce-scattered theirs during backward).
2. Sequence parallelism: params replicated over tp whose grads each tp rank computed from
   its own sequence slice (``sequence_parallel=True``: norm weights, row-parallel bias)
   are all-reduced over tp.
3. Pipeline parallelism with tied embeddings: the word embedding on the first stage and
   the output weight on the last stage (``shared_embedding=True``) are one parameter;
   their grads are all-reduced over the embedding group (first + last stage ranks).
4. Per-token loss: with ``num_tokens`` given, the token count is summed over the
   pipeline's last stage and dp x cp, and all grads are divided by it.

The schedules call it through ``hooks.finalize_model_grads_func``
(``build_training_hooks``). Grads live in ``param.main_grad`` (DDP buffers); with the
distributed optimizer only this rank's shard of each bucket is valid after step 1, which
is enough because the steps below are element-wise and every tp rank (and both embedding
stages, whose tied weight gets a bucket of its own) lays its buckets out identically.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megacore import parallel_state

__all__ = ["finalize_model_grads"]


def _main_grad(param: torch.nn.Parameter) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    grad = grad if grad is not None else param.grad
    # FSDP2: this rank's dp shard; tp ranks and both tied-embedding stages shard the same
    # way, so the element-wise reductions below work on shards.
    return grad.to_local() if isinstance(grad, DTensor) else grad


def _allreduce_flat(grads: List[torch.Tensor], group: dist.ProcessGroup) -> None:
    """All-reduce several grads as one flat tensor and copy the sums back."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum numel], contiguous
    dist.all_reduce(flat, group=group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def _allreduce_sequence_parallel_grads(model: List[torch.nn.Module],
                                       pgs: parallel_state.ProcessGroupCollection) -> None:
    if pgs.size("tp") == 1:
        return
    grads = [_main_grad(p) for chunk in model for p in chunk.parameters()
             if p.requires_grad and getattr(p, "sequence_parallel", False)]
    _allreduce_flat([g for g in grads if g is not None], pgs.tp)


def _allreduce_embedding_grads(model: List[torch.nn.Module],
                               pgs: parallel_state.ProcessGroupCollection) -> None:
    if pgs.size("pp") == 1 or pgs.embd is None or pgs.size("embd") == 1:
        return
    pp_rank = pgs.rank("pp")
    chunks = []
    if pp_rank == 0:
        chunks.append(model[0])  # the word embedding lives in the first chunk
    if pp_rank == pgs.size("pp") - 1:
        chunks.append(model[-1])  # the output layer in the last chunk
    grads = [_main_grad(p) for chunk in chunks for p in chunk.parameters()
             if p.requires_grad and getattr(p, "shared_embedding", False)]
    _allreduce_flat([g for g in grads if g is not None], pgs.embd)


def _scale_by_num_tokens(model: List[torch.nn.Module], num_tokens: torch.Tensor,
                         pgs: parallel_state.ProcessGroupCollection) -> None:
    # Only the last stage computed the loss, so its count is the one that matters.
    num_tokens = num_tokens.detach().clone().to(torch.float32).reshape(1)
    last = dist.get_global_rank(pgs.pp, pgs.size("pp") - 1)
    dist.broadcast(num_tokens, src=last, group=pgs.pp)
    dist.all_reduce(num_tokens, group=pgs.dp_cp)
    if num_tokens.item() > 0:
        for chunk in model:
            if hasattr(chunk, "scale_gradients"):
                chunk.scale_gradients(1.0 / num_tokens.item())
            else:  # FSDP2 chunk: grads are sharded DTensors
                for param in chunk.parameters():
                    if param.grad is not None:
                        param.grad.mul_(1.0 / num_tokens.item())


def finalize_model_grads(model: List[torch.nn.Module], num_tokens: Optional[torch.Tensor] = None,
                         *, pg_collection: Optional[parallel_state.ProcessGroupCollection] = None
                         ) -> None:
    """Reduce grads over dp, tp (sequence parallel) and the embedding group; optionally
    divide by the global token count.

    Args:
        model: the model chunks (``DistributedDataParallel`` instances) of this rank.
        num_tokens: tokens in this rank's loss (per-token loss); None to skip scaling.
        pg_collection: explicit groups (default: ``parallel_state``'s).
    """
    pgs = pg_collection or parallel_state.get_process_group_collection()
    for chunk in model:
        if hasattr(chunk, "finish_grad_sync"):  # FSDP2 chunks reduced during backward
            chunk.finish_grad_sync()
    _allreduce_sequence_parallel_grads(model, pgs)
    _allreduce_embedding_grads(model, pgs)
    if num_tokens is not None:
        _scale_by_num_tokens(model, num_tokens, pgs)
