"""Hostile and corrupt checkpoints: nothing in them runs, every failure names the file.

One tiny run (``examples/pretrain_gpt.py``, one rank, 2 iterations) saves a ``torch`` and
a ``torch_dist`` checkpoint; each test copies one and breaks it.
"""

import os
import pickle
import shlex
import shutil
import subprocess
import sys

import pytest

from megacore.checkpointing import CheckpointError, read_checkpoint_info
from megacore.checkpointing.safe_dcp import UnsafeCheckpointError
from tests.multirank import run_distributed
from tests.training.test_pretrain_gpt import _run_pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSPECT = os.path.join(ROOT, "tools", "checkpoint", "inspect.py")
CONVERT = os.path.join(ROOT, "tools", "checkpoint", "convert.py")
PRETRAIN = os.path.join(ROOT, "examples", "pretrain_gpt.py")

MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 4 --lr 1e-3 "
         "--mock-data --vocab-size 97 --log-interval 1 --eval-iters 0 --seed 5")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    for fmt in ("torch", "torch_dist"):
        argv = shlex.split(f"{MODEL} --train-iters 2 --save {root / fmt} --ckpt-format {fmt}")
        run_distributed(_run_pretrain, 1, args=(argv,), timeout=240)
    return root


def _copy(saved, fmt, tmp_path):
    dst = tmp_path / fmt
    shutil.copytree(saved / fmt, dst)
    return dst


class _Bomb:
    """Unpickling this calls ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _plant_bomb(ckpt, tmp_path):
    marker = tmp_path / "PWNED"
    metadata = ckpt / "iter_0000002" / ".metadata"
    with open(metadata, "wb") as f:
        pickle.dump(_Bomb(f"touch {marker}"), f)
    return metadata, marker


def _run(cmd, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def test_pickle_bomb_metadata_never_runs(saved, tmp_path):
    ckpt = _copy(saved, "torch_dist", tmp_path)
    metadata, marker = _plant_bomb(ckpt, tmp_path)
    # The library entry point used by inspect, the converter, --load and the server.
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle posix.system") as e:
        read_checkpoint_info(str(ckpt))
    assert str(metadata) in str(e.value)
    # The command-line paths, each in a fresh interpreter.
    inspect = _run([sys.executable, INSPECT, str(ckpt), "--verify"])
    assert inspect.returncode == 2 and str(metadata) in inspect.stderr, inspect.stderr
    convert = _run([sys.executable, CONVERT, "--model-type", "GPT", "--loader", "megacore",
                    "--saver", "megacore", "--load-dir", str(ckpt), "--save-dir",
                    str(tmp_path / "out")])
    assert convert.returncode != 0 and str(metadata) in convert.stderr, convert.stderr[-2000:]
    pretrain = _run([sys.executable, PRETRAIN] + shlex.split(MODEL)
                    + ["--train-iters", "3", "--load", str(ckpt), "--save", str(ckpt)])
    assert pretrain.returncode != 0
    assert "refusing to unpickle posix.system" in pretrain.stderr, pretrain.stderr[-2000:]
    assert str(metadata) in pretrain.stderr
    assert not marker.exists()


def test_garbage_metadata_is_a_named_error(saved, tmp_path):
    ckpt = _copy(saved, "torch_dist", tmp_path)
    metadata = ckpt / "iter_0000002" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="unreadable DCP metadata") as e:
        read_checkpoint_info(str(ckpt))
    assert str(metadata) in str(e.value)
