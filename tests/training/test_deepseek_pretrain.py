"""A tiny DeepSeek-V3-style model through examples/pretrain_gpt.py: multi-latent attention,
a dense first layer then MoE layers with sigmoid group-limited routing, expert bias and a
routing scale. Each layout reproduces the single rank's losses and grad norms (tolerances
as in test_pretrain_gpt: rtol 1e-5 on losses, 1e-4 on norms)."""

import pytest
import torch

from tests.training.test_pretrain_gpt import _train

DEEPSEEK = (
    "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
    "--multi-latent-attention --q-lora-rank 16 --kv-lora-rank 16 --qk-head-dim 8 "
    "--qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 --moe-ffn-hidden-size 16 "
    "--moe-router-topk 2 --moe-router-score-function sigmoid --moe-router-enable-expert-bias "
    "--moe-router-num-groups 2 --moe-router-group-topk 1 --moe-router-topk-scaling-factor 2.5 "
    "--moe-layer-freq 0,1,1,1 --moe-router-load-balancing-type seq_aux_loss "
    "--moe-aux-loss-coeff 1e-3")

LAYOUTS = [
    ("tp2_sp", 2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    ("tp4_sp", 4, "--tensor-model-parallel-size 4 --sequence-parallel"),
    ("cp2", 2, "--context-parallel-size 2"),
    ("cp2_pp2", 4, "--context-parallel-size 2 --pipeline-model-parallel-size 2"),
    ("pp2", 2, "--pipeline-model-parallel-size 2"),
    ("ep2", 2, "--expert-model-parallel-size 2"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ref"), "ref", 1, DEEPSEEK)


@pytest.mark.parametrize("name, world, extra", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_deepseek_style_model_layouts_equal_single_rank(reference, tmp_path, name, world, extra):
    ref_losses, ref_norms = reference
    assert ref_losses[-1] < ref_losses[0], "the reference run should be learning"
    losses, norms = _train(tmp_path, name, world, f"{DEEPSEEK} {extra}")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=0)


MTP_LAYOUTS = [
    ("tp2_sp", 2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    ("ep2_dp2", 2, "--expert-model-parallel-size 2"),
    ("pp2", 2, "--pipeline-model-parallel-size 2"),
    # FSDP2 gathers each MTP depth (with its experts) as a unit of its own.
    ("pp2_fsdp2_dp2", 4, "--pipeline-model-parallel-size 2 --use-torch-fsdp2"),
]


def _mtp_losses(path):
    import json

    with open(path) as f:
        return [r["mtp_1_loss"] for r in map(json.loads, f) if "mtp_1_loss" in r]


@pytest.fixture(scope="module")
def mtp_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp_ref")
    return _train(path, "ref", 1, f"{DEEPSEEK} --mtp-num-layers 1"), _mtp_losses(path / "ref.jsonl")


@pytest.mark.parametrize("name, world, extra", MTP_LAYOUTS, ids=[l[0] for l in MTP_LAYOUTS])
def test_multi_token_prediction_layouts_equal_single_rank(mtp_reference, tmp_path, name, world,
                                                          extra):
    (ref_losses, ref_norms), ref_mtp = mtp_reference
    assert len(ref_mtp) == len(ref_losses) and ref_mtp[-1] < ref_mtp[0]
    losses, norms = _train(tmp_path, name, world, f"{DEEPSEEK} --mtp-num-layers 1 {extra}")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(_mtp_losses(tmp_path / f"{name}.jsonl")),
                               torch.tensor(ref_mtp), rtol=1e-5, atol=0)
