"""Megatron's auto-resume through examples/pretrain_gpt.py.

* ``--save X --load X`` with X missing, empty or without a checkpoint in it trains from scratch after ONE warning line,
  then a second start resumes from X (iterations continue, losses equal an uninterrupted
  run bitwise: same layout, deterministic mode).
* ``--exit-on-missing-checkpoint`` keeps the error, naming the flag.
* A resumed run (here from a converted checkpoint) takes the checkpoint's batch sizes when
  the flags are not given, says so, and continues exactly; a different batch size given is
  used and reported naming the flag.
"""

import json
import shlex

import pytest
import torch

from megacore.checkpointing import CheckpointError
from megacore.checkpointing.conversion import convert_checkpoint
from tests.multirank import run_distributed
from tests.training.test_pretrain_gpt import _run_pretrain

BATCH = "--micro-batch-size 2 --global-batch-size 8"
MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --lr 1e-2 --train-iters 4 --mock-data --vocab-size 97 "
         "--log-interval 1 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0 --seed 7 "
         "--lr-warmup-iters 1 --deterministic-mode")


def _train(tmp_path, name, extra, batch=BATCH):
    log = tmp_path / f"{name}.jsonl"
    run_distributed(_run_pretrain, 1, args=(shlex.split(f"{MODEL} {batch} {extra} "
                                                        f"--log-jsonl {log}"),), timeout=240)
    with open(log) as f:
        return [r for r in map(json.loads, f) if "lm_loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("straight"), "straight", "")


@pytest.mark.parametrize("state", ["missing", "empty", "tensorboard_only"])
def test_save_load_same_directory_starts_then_resumes(tmp_path, capfd, state, straight):
    ckpt = tmp_path / "ckpt"
    if state != "missing":
        ckpt.mkdir()
    if state == "tensorboard_only":  # Megatron's Mixtral script logs under the checkpoint path
        (ckpt / "tensorboard").mkdir()
        (ckpt / "tensorboard" / "events.out").write_text("x")
    capfd.readouterr()
    first = _train(tmp_path, "first", f"--save {ckpt} --load {ckpt} --save-interval 2 "
                                      "--exit-interval 2")
    out = capfd.readouterr().out
    warnings = [line for line in out.splitlines() if "no checkpoint found" in line]
    assert warnings == [f"WARNING: --load {ckpt}: no checkpoint found; training from scratch"]
    second = _train(tmp_path, "second", f"--save {ckpt} --load {ckpt} --save-interval 2")
    assert "no checkpoint found" not in capfd.readouterr().out
    assert [r["iteration"] for r in first + second] == [1, 2, 3, 4]
    assert [r["lm_loss"] for r in first + second] == [r["lm_loss"] for r in straight]


def test_exit_on_missing_checkpoint_keeps_the_error(tmp_path):
    with pytest.raises(AssertionError, match="--exit-on-missing-checkpoint") as info:  # rank error
        _train(tmp_path, "x", f"--load {tmp_path / 'nothing'} --exit-on-missing-checkpoint")
    assert "no checkpoint there" in str(info.value)
    assert CheckpointError.__name__ in str(info.value)


def test_resume_uses_the_checkpoint_batch_sizes(tmp_path, capfd, straight):
    """Before: resuming a converted checkpoint without batch flags silently trained with
    micro/global batch 1/1 and reported the dataset exhausted."""
    ckpt, converted = tmp_path / "ckpt", tmp_path / "converted"
    _train(tmp_path, "first", f"--save {ckpt} --save-interval 2 --exit-interval 2 "
                              "--ckpt-format torch")
    convert_checkpoint(load_dir=str(ckpt), save_dir=str(converted), ckpt_format="torch_dist",
                       target_tensor_parallel_size=1, target_pipeline_parallel_size=1,
                       progress=False)
    capfd.readouterr()
    second = _train(tmp_path, "second", f"--load {converted}", batch="")
    out = capfd.readouterr().out
    assert f"--global-batch-size 8: taken from the checkpoint {converted}" in out
    assert f"--micro-batch-size 2: taken from the checkpoint {converted}" in out
    assert [r["iteration"] for r in second] == [3, 4]
    assert [r["consumed_samples"] for r in second] == [24, 32]
    assert [r["global_batch_size"] for r in second] == [8, 8]
    torch.testing.assert_close(torch.tensor([r["lm_loss"] for r in second]),
                               torch.tensor([r["lm_loss"] for r in straight[2:]]),
                               rtol=1e-5, atol=0)
    # A different batch size given on the command line is used, and said so.
    capfd.readouterr()
    changed = _train(tmp_path, "changed", f"--load {converted} --override-opt_param-scheduler",
                     batch="--micro-batch-size 2 --global-batch-size 4")
    out = capfd.readouterr().out
    assert "WARNING: --global-batch-size 4 differs from the checkpoint's 8" in out
    assert [r["global_batch_size"] for r in changed] == [4, 4]
