"""Gradient reduction end to end through examples/pretrain_gpt.py: ``--overlap-grad-reduce``
with one-rank data-parallel groups, and ``--calculate-per-token-loss``, each against the
single process on loss AND grad norm.

Tolerances are those of the layout tests (tests/training/test_pretrain_gpt.py): rtol 1e-5
on losses (sharded matmuls and all-reduces sum in another order, ~1e-7 observed) and 1e-4
on grad norms (squares summed in another order).
"""

import pytest
import torch

from tests.training.test_pretrain_gpt import _train

SHORT = "--train-iters 3"
MOE = "--num-experts 4 --moe-ffn-hidden-size 32 --moe-router-topk 2 --moe-layer-freq 1,0,1,0"


def _assert_matches(got, ref):
    (losses, norms), (ref_losses, ref_norms) = got, ref
    assert len(losses) == len(ref_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refs")
    return {"dense": _train(tmp, "dense", 1, SHORT), "moe": _train(tmp, "moe", 1, f"{SHORT} {MOE}"),
            "per_token": _train(tmp, "per_token", 1,
                                f"{SHORT} --calculate-per-token-loss --eod-mask-loss"),
            "mean_of_means": _train(tmp, "mean", 1, f"{SHORT} --eod-mask-loss")}


OVERLAP = [
    # (id, reference, ranks, flags): dp 1 everywhere but the last two dense rows; the MoE
    # rows have an expert-data-parallel group of one rank (ep 2 on 2 ranks).
    ("dp1", "dense", 1, ""),
    ("tp2", "dense", 2, "--tensor-model-parallel-size 2"),
    ("tp2_dp2", "dense", 4, "--tensor-model-parallel-size 2"),
    ("pp2_vpp2", "dense", 2, "--pipeline-model-parallel-size 2 "
                             "--num-layers-per-virtual-pipeline-stage 1"),
    ("ep2", "moe", 2, f"{MOE} --expert-model-parallel-size 2"),
]


@pytest.mark.parametrize("distopt", ["", "--use-distributed-optimizer"], ids=["ddp", "distopt"])
@pytest.mark.parametrize("name, ref, world, extra", OVERLAP, ids=[c[0] for c in OVERLAP])
def test_overlap_grad_reduce_equals_single_process(references, tmp_path, name, ref, world,
                                                   extra, distopt):
    got = _train(tmp_path, name, world, f"{SHORT} {extra} {distopt} --overlap-grad-reduce "
                                        "--ddp-bucket-size 2000")
    _assert_matches(got, references[ref])


@pytest.mark.parametrize("name, world, extra", [
    ("dp2", 2, ""), ("cp2", 2, "--context-parallel-size 2"),
    ("dp2_overlap_distopt", 2, "--overlap-grad-reduce --use-distributed-optimizer"),
])
def test_per_token_loss_equals_single_process(references, tmp_path, name, world, extra):
    """--eod-mask-loss makes the token count differ between micro-batches and ranks, so a
    mean of per-micro-batch means (or a sum not divided by the global count: 2.00x the
    grad norm at dp 2 before the fix) would not match."""
    got = _train(tmp_path, name, world,
                 f"{SHORT} --calculate-per-token-loss --eod-mask-loss {extra}")
    _assert_matches(got, references["per_token"])
    assert references["mean_of_means"][1] != references["per_token"][1], \
        "the token counts must differ between micro-batches for this test to discriminate"
