"""Conversions of checkpoints written by ``examples/pretrain_gpt.py`` (its run config dict is
what the converter reads).

* Training continues after a layout change: save at tp=2 (legacy) at iteration 2,
  convert to pp=2 with the optimizer state, resume there (``--no-load-rng``; dropout off,
  so no RNG state matters) and the losses of iterations 3-4 equal the uninterrupted
  tp=2 run within rtol 1e-5 (the fp32 tolerance of the layout tests: tp and pp only
  reorder reductions).
* ``--ckpt-convert-format torch_dist --ckpt-convert-save DIR`` re-saves a legacy
  checkpoint in the other format: every model and optimizer tensor is bitwise the same
  (compared through the converter's canonical view) and DIR loads and trains.
"""

import json
import shlex

import torch

from megacore.checkpointing import verify_checkpoint
from megacore.checkpointing.conversion import convert_checkpoint, open_megacore_source
from tests.multirank import run_distributed
from tests.training.test_pretrain_gpt import _run_pretrain

MODEL = ("--num-layers 2 --hidden-size 16 --num-attention-heads 4 --seq-length 8 "
         "--max-position-embeddings 8 --micro-batch-size 2 --global-batch-size 4 --lr 1e-2 "
         "--mock-data --vocab-size 61 --log-interval 1 --eval-iters 0 --hidden-dropout 0 "
         "--attention-dropout 0 --seed 3 --lr-warmup-iters 1 --weight-decay 0.1 "
         "--swiglu --normalization RMSNorm --position-embedding-type rope "
         "--disable-bias-linear --untie-embeddings-and-output-weights")


def _train(tmp_path, name, world, extra):
    log = tmp_path / f"{name}.jsonl"
    run_distributed(_run_pretrain, world,
                    args=(shlex.split(f"{MODEL} {extra} --log-jsonl {log}"),), timeout=240)
    with open(log) as f:
        return [r for r in map(json.loads, f) if "lm_loss" in r]


def _canonical(load_dir):
    source = open_megacore_source(str(load_dir))
    keys = [f"model/{n}" for n in source.model_names()]
    keys += [f"optimizer/{f}/{n}" for n in source.model_names()
             for f in source.optimizer_fields(n)]
    return source.read(keys)


def test_training_continues_after_layout_change(tmp_path):
    straight = _train(tmp_path, "straight", 2, "--tensor-model-parallel-size 2 --train-iters 4")
    ckpt = tmp_path / "tp2"
    first = _train(tmp_path, "first", 2, f"--tensor-model-parallel-size 2 --train-iters 4 "
                                         f"--save {ckpt} --save-interval 2 --exit-interval 2 "
                                         "--ckpt-format torch")
    assert [r["iteration"] for r in first] == [1, 2]
    converted = tmp_path / "pp2"
    convert_checkpoint(load_dir=str(ckpt), save_dir=str(converted), ckpt_format="torch",
                       target_tensor_parallel_size=1, target_pipeline_parallel_size=2,
                       progress=False)
    second = _train(tmp_path, "second", 2, f"--pipeline-model-parallel-size 2 --train-iters 4 "
                                           f"--load {converted} --no-load-rng --ckpt-format torch")
    assert [r["iteration"] for r in second] == [3, 4]
    assert verify_checkpoint(str(converted)) == []
    losses = torch.tensor([r["lm_loss"] for r in first + second])
    torch.testing.assert_close(losses, torch.tensor([r["lm_loss"] for r in straight]),
                               rtol=1e-5, atol=0)


def test_ckpt_convert_format_flag_gives_a_loadable_checkpoint(tmp_path):
    ckpt = tmp_path / "legacy"
    _train(tmp_path, "first", 2, f"--tensor-model-parallel-size 2 --train-iters 2 "
                                 f"--save {ckpt} --save-interval 2 --ckpt-format torch")
    dist_dir = tmp_path / "dist"
    run_distributed(_run_pretrain, 2, args=(shlex.split(
        f"{MODEL} --tensor-model-parallel-size 2 --train-iters 2 --load {ckpt} "
        f"--ckpt-convert-format torch_dist --ckpt-convert-save {dist_dir}"),), timeout=240)
    assert verify_checkpoint(str(dist_dir)) == []
    legacy, dist = _canonical(ckpt), _canonical(dist_dir)
    assert sorted(legacy) == sorted(dist) and any(k.startswith("optimizer/") for k in legacy)
    assert all(torch.equal(legacy[k], dist[k]) for k in legacy)
    # It loads (other layout, torch_dist) and training goes on from iteration 2.
    resumed = _train(tmp_path, "resumed", 1, f"--train-iters 3 --load {dist_dir} "
                                             "--use-checkpoint-opt_param-scheduler")
    assert [r["iteration"] for r in resumed] == [3]
