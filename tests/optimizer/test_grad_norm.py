"""The global grad norm with expert parallelism and data-parallel replicas or shards,
against a hand-computed value.

4 ranks, tp=1, ep=2 (dense dp=4, expert dp=2). Grads are set by hand after the
reduction: dense grads identical on every rank (as after an all-reduce), expert grads
different per ep rank (different experts) and identical over expert dp. Expected
norm^2 = sum(dense^2) + sum over ep ranks of sum(expert^2). Small-integer grads: rtol
1e-12 on the fp64-accumulated norm.
"""

import math

import torch

from megacore import parallel_state
from megacore.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megacore.model_parallel_config import ModelParallelConfig
from megacore.optimizer import OptimizerConfig, get_megatron_optimizer
from tests.distributed import toy_training  # noqa: F401 - warms torch.optim before forking
from tests.multirank import run_distributed


class _MoEish(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Parameter(torch.zeros(6))
        self.dense_matrix = torch.nn.Parameter(torch.zeros(5, 3))
        self.expert = torch.nn.Parameter(torch.zeros(4, 2))
        self.expert.allreduce = False


def _dense_value(i):
    return float(i % 3 + 1)


def _expert_value(i, ep_rank):
    return float(i % 2 + 1 + 3 * ep_rank)


def _norm(use_distributed_optimizer, log_zeros):
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    model = DistributedDataParallel(
        ModelParallelConfig(expert_model_parallel_size=2),
        DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer),
        _MoEish())
    optimizer = get_megatron_optimizer(
        OptimizerConfig(lr=0.0, clip_grad=0.0, log_num_zeros_in_grad=log_zeros,
                        use_distributed_optimizer=use_distributed_optimizer), [model])
    model.zero_grad_buffer()
    model.finish_grad_sync()
    with torch.no_grad():
        for name, p in model.module.named_parameters():
            flat = p.main_grad.view(-1)
            for i in range(flat.numel()):
                flat[i] = _expert_value(i, ep_rank) if name == "expert" else _dense_value(i)
            if name == "dense":
                flat[0] = 0.0  # one zero in a dense grad: counted once
    return optimizer.step(), parallel_state.get_expert_data_parallel_world_size()


def test_grad_norm_counts_dense_once_and_every_expert():
    dense = [0.0] + [_dense_value(i) for i in range(1, 6)] + [_dense_value(i) for i in range(15)]
    experts = [_expert_value(i, ep) for ep in range(2) for i in range(8)]
    expected = math.sqrt(sum(v * v for v in dense + experts))
    for use_distributed_optimizer in (False, True):
        for (ok, norm, zeros), expert_dp in run_distributed(
                _norm, 4, args=(use_distributed_optimizer, True)):
            assert ok and expert_dp == 2
            assert math.isclose(norm, expected, rel_tol=1e-12), (norm, expected)
            assert zeros == 1
