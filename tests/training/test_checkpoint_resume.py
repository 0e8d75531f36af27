"""Checkpoints through examples/pretrain_gpt.py: exact resume, resharding, flags, SIGTERM.

Exact resume is bitwise (``--deterministic-mode``, same layout, dropout on so the RNG
states must be restored too). Resuming a torch_dist checkpoint in another layout is
compared with rtol 1e-5, the fp32 tolerance of the layout tests.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.multirank import run_distributed
from tests.training.test_pretrain_gpt import ROOT, SCRIPT, _run_pretrain

MODEL = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 8 --lr 1e-2 "
         "--train-iters 6 --mock-data --vocab-size 97 --log-interval 1 --eval-iters 0 "
         "--hidden-dropout 0.1 --attention-dropout 0.0 --seed 11 --lr-warmup-iters 1 "
         "--deterministic-mode")


def _records(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if "lm_loss" in r]


def _train(tmp_path, name, world, extra):
    log = tmp_path / f"{name}.jsonl"
    run_distributed(_run_pretrain, world, args=(shlex.split(f"{MODEL} {extra} --log-jsonl {log}"),),
                    timeout=240)
    return _records(log)


CASES = [
    ("torch", "--tensor-model-parallel-size 2", 2),
    ("torch", "--pipeline-model-parallel-size 2 --use-distributed-optimizer", 2),
    ("torch_dist", "--tensor-model-parallel-size 2 --use-distributed-optimizer", 2),
    ("torch_dist", "--pipeline-model-parallel-size 2", 2),
    # Experts on both pipeline stages must be saved under their global layer numbers.
    ("torch_dist", "--pipeline-model-parallel-size 2 --num-experts 4 --moe-ffn-hidden-size 32", 2),
]


@pytest.mark.parametrize("fmt, layout, world", CASES,
                         ids=["torch-tp2", "torch-pp2-distopt", "torch_dist-tp2-distopt",
                              "torch_dist-pp2", "torch_dist-pp2-moe"])
def test_exact_resume_is_bitwise(tmp_path, fmt, layout, world):
    straight = _train(tmp_path, "straight", world, layout)
    ckpt = tmp_path / "ckpt"
    first = _train(tmp_path, "first", world, f"{layout} --save {ckpt} --save-interval 3 "
                                             f"--exit-interval 3 --ckpt-format {fmt}")
    assert [r["iteration"] for r in first] == [1, 2, 3]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    second = _train(tmp_path, "second", world, f"{layout} --load {ckpt} --ckpt-format {fmt}")
    assert [r["iteration"] for r in second] == [4, 5, 6]
    resumed = first + second
    assert [r["lm_loss"] for r in resumed] == [r["lm_loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    assert [r["consumed_samples"] for r in resumed] == [r["consumed_samples"] for r in straight]


NO_DROPOUT = "--hidden-dropout 0"


@pytest.mark.parametrize("save_layout, save_world, load_layout, load_world", [
    ("--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2", 4, "", 1),
    ("", 1, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2", 4),
], ids=["tp2pp2-to-tp1pp1", "tp1pp1-to-tp2pp2"])
def test_torch_dist_resumes_in_another_layout(tmp_path, save_layout, save_world, load_layout,
                                              load_world):
    straight = _train(tmp_path, "straight", 1, NO_DROPOUT)
    ckpt = tmp_path / "ckpt"
    first = _train(tmp_path, "first", save_world,
                   f"{NO_DROPOUT} {save_layout} --save {ckpt} --save-interval 3 --exit-interval 3")
    second = _train(tmp_path, "second", load_world, f"{NO_DROPOUT} {load_layout} --load {ckpt}")
    losses = [r["lm_loss"] for r in first + second]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([r["lm_loss"] for r in straight]),
                               rtol=1e-5, atol=0)


def test_fsdp2_resumes_exactly_and_in_a_non_fsdp_layout(tmp_path):
    """FSDP2 at dp 4 saves torch_dist (params and Adam state gathered over dp); it resumes
    bitwise under FSDP2 and continues with the same losses as tp 2 x dp 2 with DDP."""
    # No dropout: the masks of tp 2 x dp 2 are not those of dp 4.
    fsdp = f"{NO_DROPOUT} --use-torch-fsdp2 --fsdp-reshard-after-forward"
    ckpt = tmp_path / "ckpt"
    straight = _train(tmp_path, "straight", 4, f"{fsdp} --save {ckpt} --save-interval 3")
    # Resume from iteration 3 (Megatron's tracker file names the checkpoint to load).
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    second = _train(tmp_path, "second", 4, f"{fsdp} --load {ckpt}")
    assert [r["iteration"] for r in second] == [4, 5, 6]
    assert [r["lm_loss"] for r in second] == [r["lm_loss"] for r in straight[3:]]
    assert [r["grad_norm"] for r in second] == [r["grad_norm"] for r in straight[3:]]
    other = _train(tmp_path, "other", 4, f"{NO_DROPOUT} --tensor-model-parallel-size 2 "
                                         f"--load {ckpt}")
    torch.testing.assert_close(torch.tensor([r["lm_loss"] for r in other]),
                               torch.tensor([r["lm_loss"] for r in straight[3:]]),
                               rtol=1e-5, atol=0)


def test_load_flags_behave_as_in_megatron(tmp_path):
    ckpt = tmp_path / "ckpt"
    straight = _train(tmp_path, "straight", 1, "")
    _train(tmp_path, "first", 1, f"--save {ckpt} --save-interval 3 --exit-interval 3")
    exact = _train(tmp_path, "exact", 1, f"--load {ckpt}")
    # --load alone: the model shape comes from the checkpoint's saved configuration.
    log = tmp_path / "load_alone.jsonl"
    minimal = ("--lr 1e-2 --train-iters 6 --mock-data --micro-batch-size 2 --global-batch-size 8 "
               "--log-interval 1 --eval-iters 0 --hidden-dropout 0.1 --attention-dropout 0.0 "
               f"--seed 11 --lr-warmup-iters 1 --deterministic-mode --load {ckpt} --log-jsonl {log}")
    run_distributed(_run_pretrain, 1, args=(shlex.split(minimal),), timeout=240)
    assert [r["lm_loss"] for r in _records(log)] == [r["lm_loss"] for r in straight[3:]]
    no_optim = _train(tmp_path, "no_optim", 1, f"--load {ckpt} --no-load-optim")
    no_rng = _train(tmp_path, "no_rng", 1, f"--load {ckpt} --no-load-rng")
    finetune = _train(tmp_path, "finetune", 1, f"--load {ckpt} --finetune")
    expected = [r["lm_loss"] for r in straight[3:]]
    assert [r["lm_loss"] for r in exact] == expected
    # Fresh Adam moments: the first step after loading differs, the iteration count does not.
    assert [r["iteration"] for r in no_optim] == [4, 5, 6]
    assert no_optim[0]["lm_loss"] == expected[0], "weights were loaded: the first loss matches"
    assert no_optim[1]["lm_loss"] != expected[1]
    # Other dropout masks: the losses differ from the exact resume.
    assert [r["iteration"] for r in no_rng] == [4, 5, 6]
    assert [r["lm_loss"] for r in no_rng] != expected
    # Finetune: weights only, counting restarts at iteration 0 with no samples consumed.
    assert [r["iteration"] for r in finetune] == [1, 2, 3, 4, 5, 6]
    assert finetune[0]["consumed_samples"] == 8


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, SCRIPT] + shlex.split(MODEL.replace("--train-iters 6", "--train-iters 100000")) \
        + ["--exit-signal-handler", "--save", str(ckpt)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        for line in proc.stdout:
            if "iteration        3/" in line:
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "training did not start"
        output = proc.stdout.read()
        assert proc.wait(timeout=120) == 0, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 3
    assert f"saved checkpoint at iteration {saved}" in output


ZBV = "--pipeline-model-parallel-size 2 --pipeline-schedule zbv"
UNTIED = f"{NO_DROPOUT} --untie-embeddings-and-output-weights"


@pytest.mark.parametrize("load_layout, load_world", [
    (ZBV, 2),
    # Interleaved: rank 0's chunk 1 holds layer 2 there, layer 3 under ZBV.
    ("--pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2", 2),
    ("", 1),
], ids=["zbv", "interleaved", "single"])
def test_zbv_checkpoint_resumes_by_global_layer(tmp_path, load_layout, load_world):
    """ZBV saves torch_dist under global layer numbers: it resumes under ZBV and in
    layouts whose chunks hold other layers, continuing the single-rank run's losses."""
    straight = _train(tmp_path, "straight", 1, UNTIED)
    ckpt = tmp_path / "ckpt"
    first = _train(tmp_path, "first", 2, f"{UNTIED} {ZBV} --save {ckpt} --save-interval 3 "
                                         "--exit-interval 3")
    second = _train(tmp_path, "second", load_world, f"{UNTIED} {load_layout} --load {ckpt}")
    assert [r["iteration"] for r in second] == [4, 5, 6]
    torch.testing.assert_close(torch.tensor([r["lm_loss"] for r in first + second]),
                               torch.tensor([r["lm_loss"] for r in straight]), rtol=1e-5, atol=0)
