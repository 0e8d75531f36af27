"""Global gradient norm, clipping and zero counting across every parallel axis.

The norm must be the norm of the *whole model's* gradient, each element counted once:

* tensor parallelism: a tp-split param (``tensor_model_parallel=True``) holds distinct
  elements on each tp rank; a replicated one (norm weights, row-parallel bias) is counted
  only on tp rank 0 (for expert params, ``allreduce=False``: expert-tp rank 0).
* pipeline parallelism: stages hold different layers; the word embedding and the output
  weight tied to it (``shared_embedding=True`` on both) are one param, counted on the
  first stage only (Megatron's ``shared=True`` marker is honoured too).
* data parallelism: after the reduction, a plain optimizer's grads are *replicated* over
  the dp x cp ranks (expert grads over the expert-dp ranks), while the distributed
  optimizer's are *sharded* over them, as are FSDP2's (DTensor grads: this rank's local
  shard is what counts).

Each rank sums its counted squares, weighted by ``1 / replicas`` for replicated grads, and
one all-reduce over all ranks gives the total. Reducing over the world (rather than
over, say, the model-parallel group) keeps one collective per step whatever mix of dense
and expert params a pipeline stage holds, so ranks can never disagree on which
collectives to run. The per-rank partial sums are in fp64.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Tuple

import torch
from torch.distributed.tensor import DTensor

__all__ = ["GradStatsContext", "local_grad_norm_squared", "local_num_zeros",
           "clip_grad_by_total_norm_fp32"]


@dataclasses.dataclass(frozen=True)
class GradStatsContext:
    """Which param copies one optimizer counts in gradient statistics, and how often
    each counted grad is replicated over ranks.

    Attributes:
        tp_rank: this rank's tensor-parallel rank.
        expert_tp_rank: this rank's expert-tensor-parallel rank.
        is_first_pipeline_stage: whether this rank is on pipeline stage 0.
        dense_replicas: ranks holding the same dense grad (dp x cp for a plain optimizer,
            1 for the distributed optimizer, whose shards are disjoint).
        expert_replicas: the same for expert grads (expert dp, or 1).
    """

    tp_rank: int = 0
    expert_tp_rank: int = 0
    is_first_pipeline_stage: bool = True
    dense_replicas: int = 1
    expert_replicas: int = 1

    def weight(self, param: torch.Tensor) -> float:
        """Weight of ``param``'s local grad in global sums: 0 for a duplicate copy."""
        if getattr(param, "shared", False):
            return 0.0
        if getattr(param, "shared_embedding", False) and not self.is_first_pipeline_stage:
            return 0.0
        expert = not getattr(param, "allreduce", True)
        if not getattr(param, "tensor_model_parallel", False):
            if (self.expert_tp_rank if expert else self.tp_rank) != 0:
                return 0.0
        return 1.0 / (self.expert_replicas if expert else self.dense_replicas)


GradsAndParams = Iterable[Tuple[Optional[torch.Tensor], torch.Tensor]]


def local_grad_norm_squared(grads_and_params: GradsAndParams, context: GradStatsContext,
                            device: torch.device) -> torch.Tensor:
    """This rank's weighted sum of squared grad entries (1-element fp64 tensor).

    ``grads_and_params`` pairs each main grad (possibly a shard) with the model param it
    belongs to, whose attributes decide its weight.
    """
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for grad, param in grads_and_params:
        weight = context.weight(param)
        if grad is not None and weight:
            total += _local(grad).detach().double().pow(2).sum() * weight
    return total


def _local(grad: torch.Tensor) -> torch.Tensor:
    """An FSDP2 grad's shard on this rank (the shards of all ranks are disjoint)."""
    return grad.to_local() if isinstance(grad, DTensor) else grad


def local_num_zeros(grads_and_params: GradsAndParams, context: GradStatsContext,
                    device: torch.device) -> torch.Tensor:
    """This rank's weighted count of zero grad entries (1-element fp64 tensor)."""
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for grad, param in grads_and_params:
        weight = context.weight(param)
        if grad is not None and weight:
            total += (_local(grad).detach() == 0).sum().double() * weight
    return total


def clip_grad_by_total_norm_fp32(grads: Iterable[Optional[torch.Tensor]], max_norm: float,
                                 total_norm: float) -> None:
    """Scale grads in place so their global norm is at most ``max_norm``.

    Same formula as ``torch.nn.utils.clip_grad_norm_``:
    ``coeff = max_norm / (total_norm + 1e-6)``, applied only when below 1.
    """
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for grad in grads:
            if grad is not None:
                grad.mul_(coeff)
