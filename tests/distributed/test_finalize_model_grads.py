"""finalize_model_grads on 4 gloo ranks (tp=2, pp=2): sequence-parallel grads are summed
over tp, tied-embedding grads over the first and last stage, other grads are left alone,
and num_tokens scales by the last stage's count. Grads are set by hand (small integers,
so every check is exact)."""

import torch
import torch.distributed as dist

from megacore import parallel_state
from megacore.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megacore.model_parallel_config import ModelParallelConfig
from tests.multirank import run_distributed


class _Chunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm_weight = torch.nn.Parameter(torch.zeros(4))
        self.norm_weight.sequence_parallel = True
        self.split_weight = torch.nn.Parameter(torch.zeros(3, 2))
        self.split_weight.tensor_model_parallel = True
        self.embedding = torch.nn.Parameter(torch.zeros(5, 2))
        self.embedding.shared_embedding = True


def _finalize(use_distributed_optimizer):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2,
                                             pipeline_model_parallel_size=2)
    rank = dist.get_rank()
    config = ModelParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 sequence_parallel=True)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer),
        _Chunk())
    model.zero_grad_buffer()
    for p in model.module.parameters():
        p.main_grad.fill_(rank + 1)
    # Only the last stage's count matters: 4 tokens there, a decoy on the first stage.
    num_tokens = torch.tensor(4 if parallel_state.is_pipeline_last_stage() else 1000)
    finalize_model_grads([model], num_tokens=num_tokens)
    return {n: p.main_grad.clone() for n, p in model.module.named_parameters()}


def test_sequence_parallel_embedding_and_token_scaling():
    # rank = tp_rank + 2 * pp_rank; tp groups [0,1] [2,3]; embedding groups [0,2] [1,3].
    for use_distributed_optimizer in (False, True):
        results = run_distributed(_finalize, 4, args=(use_distributed_optimizer,))
        for rank, grads in enumerate(results):
            tp_peer = rank ^ 1
            emb_peer = rank ^ 2
            expect = {"norm_weight": (rank + 1 + tp_peer + 1) / 4,
                      "split_weight": (rank + 1) / 4,
                      "embedding": (rank + 1 + emb_peer + 1) / 4}
            for name, value in expect.items():
                torch.testing.assert_close(grads[name], torch.full_like(grads[name], value),
                                           rtol=0, atol=0, msg=f"rank {rank} {name}")
