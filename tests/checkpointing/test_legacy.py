"""The legacy ("torch") format: round trip at tp=2 x pp=2, weights_only files, Megatron's
load flags, and clear errors for layouts it cannot load and for missing keys."""

import glob
import os
import re

import pytest
import torch

from megacore.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from tests.checkpointing import toy_model as toy
from tests.checkpointing.test_dist_checkpoint import _fresh, _reference, _save_and_round_trip
from tests.multirank import run_distributed


def test_legacy_round_trip_tp2_pp2_and_file_layout(tmp_path):
    counts = run_distributed(_save_and_round_trip, 4, args=(str(tmp_path), "torch", 2, 2, None))
    assert min(counts) >= 20
    names = sorted(os.path.relpath(p, tmp_path)
                   for p in glob.glob(str(tmp_path / "iter_*" / "*" / "*.pt")))
    assert names == [f"iter_0000005/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt"
                     for t in range(2) for p in range(2)]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "5"
    state = torch.load(tmp_path / names[0], weights_only=True)  # no add_safe_globals needed
    assert state["checkpoint_format"] == "torch" and state["iteration"] == 5
    assert state["parallel_layout"]["tensor_model_parallel_size"] == 2
    assert len(state["rng_state"]) == 1  # one entry per dp rank (dp=1 here)
    (message,) = run_distributed(_load_legacy_tp1, 1, args=(str(tmp_path),))
    assert re.search(r"saved with tp=2, pp=2.*this run has tp=1, pp=1.*torch_dist", message)
    assert str(tmp_path) in message


def _load_legacy_tp1(path):
    toy.setup(1, 1)
    chunks = toy.build_chunks(5)
    try:
        load_checkpoint(chunks, None, None, load_dir=path)
    except CheckpointError as exc:
        return str(exc)
    raise AssertionError("loading a tp=2 x pp=2 legacy checkpoint at tp=1 must fail")


class _Extra(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.surplus = torch.nn.Parameter(torch.ones(3))


def _flags_and_strict(path):
    chunks, opt, sched = _reference(1, 1, None)
    expected = toy.flat_state(chunks, None, None)
    save_checkpoint(3, chunks, opt, sched, save_dir=path, ckpt_format="torch",
                    consumed_train_samples=24, config_dict={"lr": 0.01})
    # finetune: weights only; counters restart; the optimizer's params follow the model.
    fresh, opt2, sched2 = _fresh(None)
    before = toy.flat_state([], opt2, sched2)
    assert load_checkpoint(fresh, opt2, sched2, load_dir=path, finetune=True) \
        == (0, 0, 0, {"lr": 0.01})
    toy.assert_states_equal(toy.flat_state(fresh, None, None), expected)
    after = toy.flat_state([], opt2, sched2)
    assert after["sched.num_steps"] == before["sched.num_steps"] == 0
    assert not any(k.endswith("exp_avg") for k in after)  # no optimizer state loaded
    # no_load_optim: iteration kept, optimizer untouched.
    fresh, opt3, _ = _fresh(None)
    assert load_checkpoint(fresh, opt3, None, load_dir=path, no_load_optim=True)[0] == 3
    assert not any(k.endswith("exp_avg") for k in toy.flat_state([], opt3, None))
    # strict: a param the checkpoint lacks is named in the error; strict=False loads.
    extra = [_Extra(toy.build_chunks(9)[0])]
    messages = []
    try:
        load_checkpoint(extra, None, None, load_dir=path)
    except CheckpointError as exc:
        messages.append(str(exc))
    load_checkpoint(extra, None, None, load_dir=path, strict=False, no_load_rng=True)
    return messages


def test_legacy_flags_and_strict_errors(tmp_path):
    (messages,) = run_distributed(_flags_and_strict, 1, args=(str(tmp_path),))
    assert len(messages) == 1
    assert "model_optim_rng.pt" in messages[0] and "surplus" in messages[0]


def test_missing_and_corrupt_checkpoint_errors(tmp_path):
    from megacore.checkpointing import read_checkpoint_info

    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_info(str(tmp_path / "nowhere"))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match="iter_0000007"):
        read_checkpoint_info(str(tmp_path))
    bad = tmp_path / "iter_0000007" / "mp_rank_00"
    bad.mkdir(parents=True)
    (bad / "model_optim_rng.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="model_optim_rng.pt is unreadable"):
        read_checkpoint_info(str(tmp_path))


def _legacy_under_zbv(path):
    from megacore import parallel_state
    toy.setup(1, 1)
    parallel_state.set_virtual_pipeline_v_shape(True)   # as --pipeline-schedule zbv does
    chunks = toy.build_chunks(5)
    errors = []
    for call in (lambda: save_checkpoint(1, chunks, None, None, save_dir=path,
                                         ckpt_format="torch", consumed_train_samples=0),
                 lambda: load_checkpoint(chunks, None, None, load_dir=path)):
        try:
            call()
        except CheckpointError as exc:
            errors.append(str(exc))
    return errors


def test_legacy_format_is_refused_under_zbv(tmp_path):
    # ZBV's chunks hold other layers at the same positions: never through the legacy files.
    run_distributed(_save_and_round_trip, 1, args=(str(tmp_path), "torch", 1, 1, None))
    (errors,) = run_distributed(_legacy_under_zbv, 1, args=(str(tmp_path),))
    assert len(errors) == 2
    assert "cannot save a legacy" in errors[0] and "cannot load a legacy" in errors[1]
    assert all("--ckpt-format torch_dist" in e for e in errors)
