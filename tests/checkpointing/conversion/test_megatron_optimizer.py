"""Megatron-LM optimizer and RNG state in and out, against megatron-core 0.16.1 itself.

megatron-core (``megatron_reference``: its own ``get_megatron_optimizer``, AdamW with
weight decay on the decay group only, and ``OptimizerParamScheduler`` with warm-up and
linear decay) trains a Llama-style model at tp 2 for two iterations, saves a legacy
checkpoint as Megatron-LM does (optimizer state dict, scheduler state, RNG states), and
goes on for two more iterations: the uninterrupted run.

* megacore loads that checkpoint directly (``load_megatron_checkpoint``, what
  ``pretrain_gpt.py --load`` calls) at tp 2: every Adam moment and step equals, bitwise
  and by param name, what megatron-core's optimizer holds; the RNG draws after the load
  equal megatron's after its save; iterations 3-4 give megatron's losses and grad norms.
  At tp 1 x dp 2 (moments resharded) the losses and grad norms are the same. Without
  the optimizer state (``no_load_optim``) the fourth loss differs: the check can fail.
* megatron -> megacore (torch_dist, tp 1) -> megatron (legacy, tp 2): megatron-core
  loads the written optimizer and scheduler state (``optimizer.load_state_dict``) to the
  same moments bitwise and continues with the uninterrupted run's losses.

Tolerances: same ops in the same order within a layout (tp 2), fp32 rounding across
layouts (tp 1 sums the tp partial products in one matmul): rtol 1e-5 as in the layout
tests; grad norms rtol 1e-5.
"""

import random

import numpy as np
import pytest
import torch

from megacore.checkpointing import CheckpointError
from megacore.checkpointing.conversion import convert_checkpoint
from tests.multirank import run_distributed

pytest.importorskip("megatron.core")

from tests.checkpointing.conversion import megatron_reference as mr  # noqa: E402

RTOL = dict(rtol=1e-5, atol=1e-6)


def _draws():
    """One draw from each generator a Megatron RNG state covers."""
    return (random.random(), float(np.random.rand()), torch.rand(2).tolist())


def _megatron_train(root):
    """Rank body (tp 2): iterations 0-1, save, RNG draws, iterations 2-3."""
    mr.stub_for_cpu()
    mr.init_parallel(tp=2)
    rank = torch.distributed.get_rank()
    model = mr.build_model("llama", tp=2).train()
    optimizer, scheduler = mr.megatron_optimizer(model)
    losses = [mr.train_step(model, optimizer, scheduler, step) for step in (0, 1)]
    moments = mr.adam_state_by_name(model, optimizer)
    torch.manual_seed(40 + rank)
    mr.save_legacy(f"{root}/meg", "llama", [model.state_dict()], rank, 0, 0, 2, 1, 1,
                   optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    draws = _draws()
    losses += [mr.train_step(model, optimizer, scheduler, step) for step in (2, 3)]
    return {"losses": losses, "moments": moments, "draws": draws}


def _megacore_resume(load_dir, tp, no_load_optim=False):
    """Rank body: megacore's model and optimizer at ``tp`` load the Megatron checkpoint
    directly; returns its moments, RNG draws, and iterations 2-3."""
    from megacore.checkpointing.conversion.megatron_format import open_megatron_source
    from megacore.checkpointing.conversion.megatron_load import load_megatron_checkpoint
    from megacore.optimizer import OptimizerConfig, OptimizerParamScheduler
    from megacore.optimizer.optimizer_factory import get_megatron_optimizer
    from tests.checkpointing.conversion import fixtures as fx

    source = open_megatron_source(load_dir)
    desc = source.description
    source.close()
    model = fx.build_model(desc, tp, 1, 1, seed=5).train()
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=mr.LR, min_lr=mr.MIN_LR,
                        weight_decay=mr.WEIGHT_DECAY, clip_grad=0.0), [model])
    scheduler = OptimizerParamScheduler(optimizer, **mr.SCHEDULE)
    iteration, *_ = load_megatron_checkpoint([model], optimizer, scheduler, load_dir=load_dir,
                                             no_load_optim=no_load_optim, no_load_rng=tp != 2)
    out = {"iteration": iteration, "draws": _draws(), "num_steps": scheduler.num_steps,
           "params": optimizer.state_dict()["params"] if not no_load_optim else None}
    losses = []
    for step in (2, 3):
        ids, labels = mr.batch(step)
        positions, _ = mr.causal_inputs()
        loss = mr.token_loss(model(ids, positions, None), labels)
        loss.backward()
        ok, grad_norm, _ = optimizer.step()
        assert ok
        optimizer.zero_grad()
        scheduler.step(1)
        losses.append((loss.item(), grad_norm))
    out["losses"] = losses
    return out


def _megatron_resume(load_dir):
    """Rank body (tp 2): megatron-core loads a legacy checkpoint with its optimizer and
    scheduler state as Megatron-LM's ``load_checkpoint`` does, then iterations 2-3."""
    mr.stub_for_cpu()
    mr.init_parallel(tp=2)
    rank = torch.distributed.get_rank()
    model = mr.build_model("llama", tp=2, seed=77).train()
    optimizer, scheduler = mr.megatron_optimizer(model)
    path = f"{load_dir}/iter_{mr.ITERATION:07d}/mp_rank_{rank:02d}/model_optim_rng.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["opt_param_scheduler"])
    moments = mr.adam_state_by_name(model, optimizer)
    losses = [mr.train_step(model, optimizer, scheduler, step) for step in (2, 3)]
    return {"moments": moments, "losses": losses}


def _assert_moments_equal(megatron, megacore_params):
    """megatron-core's moments (by its param names) equal megacore's (``0/<name>``)."""
    assert megatron
    for name, state in megatron.items():
        mine = megacore_params[f"0/{name}"]
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[field].float(), mine[field].float()), (name, field)


def _assert_same_moments(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        for field in a[name]:
            assert torch.equal(a[name][field], b[name][field]), (name, field)


def test_megatron_optimizer_and_rng_state_resume_exactly(tmp_path):
    root = str(tmp_path)
    ref = run_distributed(_megatron_train, world_size=2, args=(root,), timeout=240)
    meg = f"{root}/meg"
    # Direct load, Megatron's layout: moments bitwise, RNG draws, losses and grad norms.
    same = run_distributed(_megacore_resume, world_size=2, args=(meg, 2), timeout=240)
    for rank in (0, 1):
        assert same[rank]["iteration"] == mr.ITERATION and same[rank]["num_steps"] == 2
        _assert_moments_equal(ref[rank]["moments"], same[rank]["params"])
        assert same[rank]["draws"] == ref[rank]["draws"]
        torch.testing.assert_close(same[rank]["losses"], ref[rank]["losses"][2:], **RTOL)
    # tp 1 x dp 2: the moments resharded; the same continuation.
    other = run_distributed(_megacore_resume, world_size=2, args=(meg, 1), timeout=240)
    torch.testing.assert_close(other[0]["losses"], ref[0]["losses"][2:], **RTOL)
    fresh = run_distributed(_megacore_resume, world_size=2, args=(meg, 2, True), timeout=240)
    assert fresh[0]["losses"][0][0] == pytest.approx(ref[0]["losses"][2][0], rel=1e-5)
    assert fresh[0]["losses"][1][0] != pytest.approx(ref[0]["losses"][3][0], rel=1e-3)
    # megatron -> megacore -> megatron; megatron-core loads it and continues.
    report = convert_checkpoint(load_dir=meg, save_dir=f"{root}/mc", ckpt_format="torch_dist",
                                target_tensor_parallel_size=1, progress=False)
    assert not any("optimizer" in note for note in report.notes)
    convert_checkpoint(load_dir=f"{root}/mc", save_dir=f"{root}/back", saver="megatron",
                       ckpt_format="torch", target_tensor_parallel_size=2, progress=False)
    back = run_distributed(_megatron_resume, world_size=2, args=(f"{root}/back",),
                           timeout=240)
    for rank in (0, 1):
        _assert_same_moments(back[rank]["moments"], ref[rank]["moments"])
        torch.testing.assert_close(back[rank]["losses"], ref[rank]["losses"][2:], **RTOL)
