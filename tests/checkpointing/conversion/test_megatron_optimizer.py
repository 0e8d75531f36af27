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
* The same from megatron-core's torch_dist save (the optimizer's ``sharded_state_dict``
  and the RNG ``ShardedObject``).
* megatron -> megacore (torch_dist, tp 1) -> megatron (legacy, tp 2): megatron-core
  loads the written optimizer and scheduler state (``optimizer.load_state_dict``) to the
  same moments bitwise and continues with the uninterrupted run's losses.
* bf16 weights with ``Float16OptimizerWithFloat16Params``: fp32 main params and moments
  load bitwise into megacore's mixed-precision optimizer and round-trip back.
* ``pretrain_gpt.py --load`` resumes with the optimizer state; the error paths name the
  file.

Tolerances: same ops in the same order within a layout (tp 2), fp32 rounding across
layouts (tp 1 sums the tp partial products in one matmul): rtol 1e-5 as in the layout
tests; grad norms rtol 1e-5.
"""

import os
import random
import shlex
import shutil

import numpy as np
import pytest
import torch

from megacore.checkpointing import CheckpointError
from megacore.checkpointing.conversion import convert_checkpoint, open_source
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
    torch.manual_seed(40 + rank)  # the same RNG states in both checkpoints
    mr.save_torch_dist(f"{root}/meg_dist", "llama", model, 2, 1, 1, optimizer=optimizer,
                       scheduler=scheduler)
    draws = _draws()
    losses += [mr.train_step(model, optimizer, scheduler, step) for step in (2, 3)]
    # A different model's optimizer state (GPT-2 style, same layout), for the errors.
    other = mr.build_model("gpt2", tp=2).train()
    other_optimizer, other_scheduler = mr.megatron_optimizer(other)
    mr.train_step(other, other_optimizer, other_scheduler, 0)
    return {"losses": losses, "moments": moments, "draws": draws,
            "other_optimizer": other_optimizer.state_dict()}


def _megacore_resume(load_dir, tp, no_load_optim=False):
    """Rank body: megacore's model and optimizer at ``tp`` load the Megatron checkpoint
    directly (or a megacore one, its conversion); returns its moments, RNG draws, and
    iterations 2-3."""
    from megacore.checkpointing import load_checkpoint
    from megacore.checkpointing.conversion.megatron_format import is_megatron_checkpoint
    from megacore.checkpointing.conversion.megatron_load import load_megatron_checkpoint
    from megacore.optimizer import OptimizerConfig, OptimizerParamScheduler
    from megacore.optimizer.optimizer_factory import get_megatron_optimizer
    from tests.checkpointing.conversion import fixtures as fx

    source = open_source("auto", load_dir, load_optimizer=False)
    desc = source.description
    source.close()
    model = fx.build_model(desc, tp, 1, 1, seed=5).train()
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=mr.LR, min_lr=mr.MIN_LR,
                        weight_decay=mr.WEIGHT_DECAY, clip_grad=0.0), [model])
    scheduler = OptimizerParamScheduler(optimizer, **mr.SCHEDULE)
    load = load_megatron_checkpoint if is_megatron_checkpoint(load_dir) else load_checkpoint
    iteration, *_ = load([model], optimizer, scheduler, load_dir=load_dir,
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


def _megatron_states(load_dir, fmt, model, optimizer):
    """``(model, optimizer, scheduler)`` state dicts of this rank as Megatron-LM's
    ``load_checkpoint`` reads them: the rank file (legacy), or ``dist_checkpointing.load``
    of the model's and the optimizer's ``sharded_state_dict`` (torch_dist)."""
    import argparse

    from megatron.core import dist_checkpointing

    iter_dir = f"{load_dir}/iter_{mr.ITERATION:07d}"
    if fmt == "torch":
        rank = torch.distributed.get_rank()
        state = torch.load(f"{iter_dir}/mp_rank_{rank:02d}/model_optim_rng.pt",
                           map_location="cpu", weights_only=False)
        return state["model"], state["optimizer"], state["opt_param_scheduler"]
    model_sd = model.sharded_state_dict()
    request = {"model": model_sd,
               "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = dist_checkpointing.load(request, iter_dir)
        common = dist_checkpointing.load_common_state_dict(iter_dir)
    return loaded["model"], loaded["optimizer"], common["opt_param_scheduler"]


def _megatron_resume(load_dir, fmt="torch"):
    """Rank body (tp 2): megatron-core loads a checkpoint with its optimizer and
    scheduler state as Megatron-LM's ``load_checkpoint`` does, then iterations 2-3."""
    mr.stub_for_cpu()
    mr.init_parallel(tp=2)
    model = mr.build_model("llama", tp=2, seed=77).train()
    optimizer, scheduler = mr.megatron_optimizer(model)
    model_sd, optimizer_sd, scheduler_sd = _megatron_states(load_dir, fmt, model, optimizer)
    model.load_state_dict(model_sd, strict=True)
    optimizer.load_state_dict(optimizer_sd)
    scheduler.load_state_dict(scheduler_sd)
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
    # The torch_dist form of the same state.
    dist_form = run_distributed(_megacore_resume, world_size=2, args=(f"{root}/meg_dist", 2),
                                timeout=240)
    for rank in (0, 1):
        _assert_moments_equal(ref[rank]["moments"], dist_form[rank]["params"])
        assert dist_form[rank]["draws"] == ref[rank]["draws"]
        torch.testing.assert_close(dist_form[rank]["losses"], ref[rank]["losses"][2:], **RTOL)
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
    # ... -> megatron torch_dist: megatron-core's dist_checkpointing loads it.
    report = convert_checkpoint(load_dir=f"{root}/mc", save_dir=f"{root}/back_dist",
                                saver="megatron", ckpt_format="torch_dist",
                                target_tensor_parallel_size=2, progress=False)
    assert not report.notes
    back = run_distributed(_megatron_resume, world_size=2,
                           args=(f"{root}/back_dist", "torch_dist"), timeout=240)
    for rank in (0, 1):
        _assert_same_moments(back[rank]["moments"], ref[rank]["moments"])
        torch.testing.assert_close(back[rank]["losses"], ref[rank]["losses"][2:], **RTOL)


def _pretrain_losses(tmp_path, name, load_dir, extra=""):
    """``pretrain_gpt.py --load load_dir`` at tp 1 x dp 2 for iterations 8-9."""
    import json

    from tests.training.test_pretrain_gpt import _run_pretrain

    log = tmp_path / f"{name}.jsonl"
    argv = shlex.split(f"--load {load_dir} --no-load-rng --mock-data --micro-batch-size 1 "
                       "--global-batch-size 4 --lr 1e-2 --min-lr 1e-3 --weight-decay 0.1 "
                       "--use-checkpoint-opt_param-scheduler --train-iters 9 --log-interval 1 "
                       "--eval-iters 0 --hidden-dropout 0 --attention-dropout 0 "
                       f"--log-jsonl {log} {extra}")
    run_distributed(_run_pretrain, world_size=2, args=(argv,), timeout=240)
    with open(log) as f:
        return [(r["iteration"], r["lm_loss"]) for r in map(json.loads, f) if "lm_loss" in r]


def _rank_file(root, rank):
    return f"{root}/iter_{mr.ITERATION:07d}/mp_rank_{rank:02d}/model_optim_rng.pt"


def _rewrite_optimizer(src, dst, change):
    """A copy of checkpoint ``src`` whose rank files' ``optimizer`` is ``change(rank,
    optimizer)``."""
    shutil.copytree(src, dst)
    for rank in (0, 1):
        state = torch.load(_rank_file(dst, rank), map_location="cpu", weights_only=False)
        state["optimizer"] = change(rank, state["optimizer"])
        torch.save(state, _rank_file(dst, rank))


def _as_distributed_optimizer(rank, optimizer):
    """What megatron-core's DistributedOptimizer.state_dict keeps in the rank file: the
    param groups without params and no per-param state (that goes to distrib_optim.pt)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer["param_groups"]]
    return {"optimizer": {"param_groups": groups}}


def test_pretrain_resumes_megatron_optimizer_and_errors_name_the_file(tmp_path):
    """``pretrain_gpt.py --load <Megatron checkpoint>`` (no --no-load-optim) continues
    exactly as from the checkpoint's megacore conversion (optimizer state carried);
    without the optimizer state it does not. Optimizer state for another model, from the
    distributed optimizer, absent, or a missing rank file: errors naming the file."""
    root = str(tmp_path)
    ref = run_distributed(_megatron_train, world_size=2, args=(root,), timeout=240)
    meg = f"{root}/meg"
    convert_checkpoint(load_dir=meg, save_dir=f"{root}/mc", ckpt_format="torch_dist",
                       target_tensor_parallel_size=1, progress=False)
    direct = _pretrain_losses(tmp_path, "direct", meg)
    assert [i for i, _ in direct] == [8, 9]
    assert direct == _pretrain_losses(tmp_path, "converted", f"{root}/mc")
    fresh = _pretrain_losses(tmp_path, "fresh", meg, "--no-load-optim")
    assert fresh[0] == direct[0] and fresh[1][1] != pytest.approx(direct[1][1], rel=1e-4)
    # Another model's optimizer state.
    other = ref[0]["other_optimizer"], ref[1]["other_optimizer"]
    _rewrite_optimizer(meg, f"{root}/other", lambda rank, _: other[rank])
    with pytest.raises(CheckpointError, match=r"mp_rank_00/model_optim_rng.pt: .* the "
                                              "optimizer state is for a different model"):
        convert_checkpoint(load_dir=f"{root}/other", save_dir=f"{root}/x", progress=False)
    # The distributed optimizer: a note when converting, an error when training.
    _rewrite_optimizer(meg, f"{root}/dist", _as_distributed_optimizer)
    report = convert_checkpoint(load_dir=f"{root}/dist", save_dir=f"{root}/y",
                                progress=False)
    assert any("distrib_optim.pt" in note for note in report.notes)
    with pytest.raises(AssertionError, match=r"mp_rank_00/model_optim_rng.pt: saved by "
                                             "Megatron's distributed optimizer"):
        _pretrain_losses(tmp_path, "dist", f"{root}/dist")
    # No optimizer state saved, but asked for.
    _rewrite_optimizer(meg, f"{root}/none", lambda rank, _: None)
    with pytest.raises(AssertionError, match="holds no optimizer state; pass --no-load-optim"):
        _pretrain_losses(tmp_path, "none", f"{root}/none")
    # A missing rank file.
    shutil.copytree(meg, f"{root}/missing")
    os.remove(_rank_file(f"{root}/missing", 1))
    with pytest.raises(CheckpointError, match="mp_rank_01/model_optim_rng.pt is missing"):
        convert_checkpoint(load_dir=f"{root}/missing", save_dir=f"{root}/z", progress=False)


def _megatron_bf16_train(root):
    """Rank body (1 rank): a bf16 model, megatron-core's
    ``Float16OptimizerWithFloat16Params``, two iterations, a legacy save."""
    mr.stub_for_cpu()
    mr.init_parallel()
    model = mr.build_model("llama").train().bfloat16()  # what Float16Module does
    optimizer, scheduler = mr.megatron_optimizer(model, bf16=True)
    for step in (0, 1):
        mr.train_step(model, optimizer, scheduler, step)
    mr.save_legacy(f"{root}/meg", "llama", [model.state_dict()], 0, 0, 0, 1, 1, 1,
                   optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                   bf16=True)
    return mr.adam_state_by_name(model, optimizer)


def _megacore_bf16_load(load_dir):
    """Rank body: megacore's bf16 model and mixed-precision optimizer load it."""
    from megacore.checkpointing.conversion.megatron_format import open_megatron_source
    from megacore.checkpointing.conversion.megatron_load import load_megatron_checkpoint
    from megacore.optimizer import OptimizerConfig, get_megatron_optimizer
    from tests.checkpointing.conversion import fixtures as fx

    source = open_source("auto", load_dir, load_optimizer=False)
    desc = source.description
    source.close()
    model = fx.build_model(desc, 1, 1, 1, seed=5)
    assert next(model.parameters()).dtype == torch.bfloat16
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=mr.LR, min_lr=mr.MIN_LR,
                        weight_decay=mr.WEIGHT_DECAY, clip_grad=0.0, bf16=True), [model])
    load_megatron_checkpoint([model], optimizer, None, load_dir=load_dir)
    return optimizer.state_dict()["params"]


def _megatron_bf16_load(load_dir, fmt):
    """Rank body: megatron-core's Float16 optimizer loads a checkpoint."""
    mr.stub_for_cpu()
    mr.init_parallel()
    model = mr.build_model("llama", seed=78).train().bfloat16()
    optimizer, _ = mr.megatron_optimizer(model, bf16=True)
    with mr.cuda_type_names():
        model_sd, optimizer_sd, _ = _megatron_states(load_dir, fmt, model, optimizer)
        model.load_state_dict(model_sd, strict=True)
        optimizer.load_state_dict(optimizer_sd)
    return mr.adam_state_by_name(model, optimizer)


def test_megatron_mixed_precision_optimizer_state(tmp_path):
    """bf16 weights with fp32 main params (``fp32_from_fp16_params``): megacore's
    mixed-precision optimizer loads megatron-core's moments and main params bitwise by
    name; megatron -> megacore -> megatron (legacy and torch_dist, ``fp32_param`` keys)
    gives a state megatron-core loads to the same moments and main params, and the
    torch_dist one converts back to megacore to the same tensors."""
    root = str(tmp_path)
    ref = run_distributed(_megatron_bf16_train, world_size=1, args=(root,), timeout=240)[0]
    assert all("main_param" in s for s in ref.values())
    loaded = run_distributed(_megacore_bf16_load, world_size=1, args=(f"{root}/meg",),
                             timeout=240)[0]
    for name, state in ref.items():
        for field, value in state.items():
            assert torch.equal(value, loaded[f"0/{name}"][field].to(value.dtype)), (name, field)
    convert_checkpoint(load_dir=f"{root}/meg", save_dir=f"{root}/mc", ckpt_format="torch",
                       progress=False)
    convert_checkpoint(load_dir=f"{root}/mc", save_dir=f"{root}/back", saver="megatron",
                       ckpt_format="torch", progress=False)
    back = run_distributed(_megatron_bf16_load, world_size=1, args=(f"{root}/back", "torch"),
                           timeout=240)[0]
    _assert_same_moments(back, ref)
    convert_checkpoint(load_dir=f"{root}/mc", save_dir=f"{root}/back_dist", saver="megatron",
                       ckpt_format="torch_dist", progress=False)
    back = run_distributed(_megatron_bf16_load, world_size=1,
                           args=(f"{root}/back_dist", "torch_dist"), timeout=240)[0]
    _assert_same_moments(back, ref)
    convert_checkpoint(load_dir=f"{root}/back_dist", save_dir=f"{root}/mc2",
                       ckpt_format="torch", progress=False)
    first, second = (open_source("megacore", f"{root}/{d}") for d in ("mc", "mc2"))
    names = first.model_names()
    keys = [f"optimizer/{f}/{n}" for n in names for f in first.optimizer_fields(n)]
    assert len(keys) == 4 * len(names) and names == second.model_names()
    a, b = first.read(keys, consume=False), second.read(keys, consume=False)
    for key in keys:
        assert torch.equal(a[key], b[key]), key


def test_megatron_rng_entry_mapping():
    """The pure mapping of one Megatron RNG entry (CUDA parts taken only on CUDA, and
    only for the streams megacore tracks); a CPU-saved entry on CUDA is refused."""
    from megacore.checkpointing.conversion.megatron_rng import megacore_rng_state
    from megacore.checkpointing.rng_state import capture_rng_state
    from megacore.tensor_parallel.random import get_rng_tracker

    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 1234)
    try:
        _check_rng_entry_mapping(megacore_rng_state, capture_rng_state())
    finally:
        tracker.reset()


def _check_rng_entry_mapping(megacore_rng_state, current):
    entry = dict(mr._rng_state()[0])
    on_cpu = megacore_rng_state(entry, False, "x.pt")
    assert torch.equal(on_cpu["torch"], entry["torch_rng_state"])
    assert torch.equal(on_cpu["device"], entry["torch_rng_state"])  # CPU: the same generator
    assert on_cpu["random"] == entry["random_rng_state"]
    assert on_cpu["numpy"][1].tolist() == entry["np_rng_state"][1].tolist()
    assert sorted(on_cpu["tracker"]) == sorted(current["tracker"])
    with pytest.raises(CheckpointError, match="x.pt: the Megatron RNG state has no CUDA"):
        megacore_rng_state(entry, True, "x.pt")
    cuda = torch.arange(16, dtype=torch.uint8)
    entry.update(cuda_rng_state=cuda,
                 rng_tracker_states={"model-parallel-rng": cuda + 1, "other": cuda})
    on_cuda = megacore_rng_state(entry, True, "x.pt")
    assert torch.equal(on_cuda["device"], cuda)
    assert sorted(on_cuda["tracker"]) == ["model-parallel-rng"]
    assert torch.equal(on_cuda["tracker"]["model-parallel-rng"], cuda + 1)
