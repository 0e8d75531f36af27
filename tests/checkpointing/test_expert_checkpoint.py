"""Expert params in the torch_dist format: experts stacked on dim 0 (grouped-GEMM style,
``[El, h, F/etp]``) and experts in a ``local_experts`` list are saved one key per global
expert, so a checkpoint saved at ep=2 loads at ep=1 (and the reverse) with every expert
in place. Each layout compares with its own reference built from per-expert seeds
(exact: a checkpoint copies bytes and no arithmetic happens)."""

import torch

from megacore import parallel_state as ps
from megacore.checkpointing import load_checkpoint, save_checkpoint
from tests.multirank import run_distributed

NUM_EXPERTS, H, F = 4, 3, 4


class ToyExperts(torch.nn.Module):
    """Both expert layouts; weights of expert e drawn from seed ``seed + e``."""

    def __init__(self, seed):
        super().__init__()
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), \
            ps.get_expert_model_parallel_rank()
        n_local = NUM_EXPERTS // ep
        self.local_expert_indices = [ep_rank * n_local + i for i in range(n_local)]
        self.num_local_experts = n_local
        full = [torch.randn(H, 2 * F, generator=torch.Generator().manual_seed(seed + e))
                for e in self.local_expert_indices]
        self.weight1 = torch.nn.Parameter(torch.stack(full))  # [El, h, 2F]
        self.weight1.tensor_model_parallel, self.weight1.partition_dim = True, 2
        self.weight1.partition_stride, self.weight1.allreduce = 2, False
        self.listed = torch.nn.Module()
        self.listed.local_experts = torch.nn.ModuleList(
            [torch.nn.Linear(H, 2, bias=False) for _ in range(n_local)])
        for e, lin in zip(self.local_expert_indices, self.listed.local_experts):
            lin.weight.data.copy_(torch.full((2, H), float(seed + e)))
            lin.weight.allreduce = False


def _check(path, ep, save):
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
    if save:
        save_checkpoint(1, [ToyExperts(10)], None, None, save_dir=path,
                        ckpt_format="torch_dist", consumed_train_samples=0)
    model, reference = ToyExperts(99), ToyExperts(10)
    load_checkpoint([model], None, None, load_dir=path, no_load_rng=True)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    return model.local_expert_indices


def test_experts_reshard_between_ep_sizes(tmp_path):
    ep2, ep1 = str(tmp_path / "ep2"), str(tmp_path / "ep1")
    assert run_distributed(_check, 2, args=(ep2, 2, True)) == [[0, 1], [2, 3]]
    assert run_distributed(_check, 1, args=(ep2, 1, False)) == [[0, 1, 2, 3]]
    run_distributed(_check, 1, args=(ep1, 1, True))
    assert run_distributed(_check, 2, args=(ep1, 2, False)) == [[0, 1], [2, 3]]
