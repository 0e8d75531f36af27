"""Hostile and corrupt checkpoints: nothing in them runs, every failure names the file.

One tiny run (``examples/pretrain_gpt.py``, one rank, 2 iterations) saves a ``torch`` and
a ``torch_dist`` checkpoint; each test copies one and breaks it.
"""

import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from megacore.checkpointing import (
    CheckpointError,
    read_checkpoint_info,
    read_tracker,
    verify_checkpoint,
)
from megacore.checkpointing.dist_checkpoint import read_full_tensors
from megacore.checkpointing.integrity import write_digest
from megacore.checkpointing.safe_dcp import UnsafeCheckpointError
from tests.multirank import run_distributed
from tests.training.test_pretrain_gpt import _run_pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSPECT = os.path.join(ROOT, "tools", "checkpoint", "inspect.py")
CONVERT = os.path.join(ROOT, "tools", "checkpoint", "convert.py")
PRETRAIN = os.path.join(ROOT, "examples", "pretrain_gpt.py")

MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 4 --lr 1e-3 "
         "--mock-data --vocab-size 97 --log-interval 1 --eval-iters 0 --seed 5 --lr-decay-iters 10")


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


# -- integrity: flipped and NaN bytes --------------------------------------------------
def _largest_weight(ckpt, fmt):
    """(data file, raw bytes of its largest model weight)."""
    it = ckpt / "iter_0000002"
    if fmt == "torch":
        path = it / "mp_rank_00" / "model_optim_rng.pt"
        state = torch.load(path, weights_only=True)["model"]
    else:
        path = it / "__0_0.distcp"
        keys = [k for k, _, _ in read_checkpoint_info(str(ckpt)).tensors
                if k.startswith("model/")]
        state = read_full_tensors(str(it), keys)
    tensor = max((t for t in state.values() if t.is_floating_point()), key=torch.Tensor.numel)
    return path, tensor.contiguous().numpy().tobytes()


def _corrupt(ckpt, fmt, kind):
    path, raw = _largest_weight(ckpt, fmt)
    data = bytearray(path.read_bytes())
    at = data.find(raw)
    assert at > 0, "weight bytes not found verbatim in the file"
    while at >= 0:  # the model weight and the optimizer's fp32 copy of it
        if kind == "flip":
            data[at + 5] ^= 0x10
        else:  # 16 float32 NaNs
            data[at:at + 64] = struct.pack("<16I", *[0x7FC00000] * 16)
        at = data.find(raw, at + 1)
    path.write_bytes(bytes(data))
    return path


def _resume(ckpt, extra=""):
    argv = shlex.split(f"{MODEL} --train-iters 3 --load {ckpt} --save {ckpt} {extra}")
    run_distributed(_run_pretrain, 1, args=(argv,), timeout=240)


def _nothing_saved(ckpt):
    assert read_tracker(str(ckpt)) == 2
    assert not (ckpt / "iter_0000003").exists()


@pytest.mark.parametrize("fmt,kind,resume", [("torch", "flip", True), ("torch", "nan", False),
                                              ("torch_dist", "flip", False),
                                              ("torch_dist", "nan", True)])
def test_corrupt_bytes_are_named_and_nothing_trains(saved, tmp_path, fmt, kind, resume):
    ckpt = _copy(saved, fmt, tmp_path)
    path = _corrupt(ckpt, fmt, kind)
    problems = verify_checkpoint(str(ckpt))
    assert any(p.startswith(f"{path}: contents differ from the digest") for p in problems), \
        problems
    if resume:  # both formats share the load path after the check: one resume each
        with pytest.raises(AssertionError, match="contents differ from the digest") as e:
            _resume(ckpt)
        assert str(path) in str(e.value)
        _nothing_saved(ckpt)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_nan_weights_with_matching_digest_stop_training(saved, tmp_path, fmt):
    """Digests recomputed after the damage (or a checkpoint saved from NaN weights by an
    older version): the NaN check stops the first step, naming iteration and rank."""
    ckpt = _copy(saved, fmt, tmp_path)
    path = _corrupt(ckpt, fmt, "nan")
    write_digest(str(path))
    problems = verify_checkpoint(str(ckpt))
    assert any(f"{ckpt}" in p and "non-finite value(s)" in p for p in problems), problems
    with pytest.raises(AssertionError, match=r"iteration 3: .*rank 0") as e:
        _resume(ckpt)
    assert "NonFinite" in str(e.value) and "no checkpoint is written" in str(e.value)
    _nothing_saved(ckpt)
    if fmt == "torch":
        return
    # With the check turned off the run goes on, but no NaN checkpoint is ever written.
    with pytest.raises(AssertionError, match="refusing to save .*iter_0000003.* NaN/Inf"):
        _resume(ckpt, "--no-check-for-nan-in-loss-and-grad")
    _nothing_saved(ckpt)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_checkpoint_without_digests_still_loads(saved, tmp_path, fmt):
    ckpt = _copy(saved, fmt, tmp_path)
    for sidecar in ckpt.rglob("*.sha256"):
        sidecar.unlink()
    assert verify_checkpoint(str(ckpt)) == []
    if fmt == "torch":
        _resume(ckpt)
    else:  # a real process, to see the log line as a user does
        proc = _run([sys.executable, PRETRAIN] + shlex.split(MODEL)
                    + ["--train-iters", "3", "--load", str(ckpt), "--save", str(ckpt)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "saved without file digests (older megacore): integrity not checked" in \
            proc.stderr
    assert read_tracker(str(ckpt)) == 3
    assert verify_checkpoint(str(ckpt)) == []  # the new save has digests and they match
    assert list((ckpt / "iter_0000003").rglob("*.sha256"))


def test_binary_tracker_is_a_named_error(saved, tmp_path):
    ckpt = _copy(saved, "torch", tmp_path)
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    tracker.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(CheckpointError, match="tracker file should hold an iteration number") \
            as e:
        read_checkpoint_info(str(ckpt))
    assert str(tracker) in str(e.value)


def _async_run_logging_tracker(argv, save_dir):
    """Train with --async-save; record, for every "saved checkpoint" line, the iteration
    the tracker names at that moment."""
    from megacore.training import training

    seen = []
    original = training.print_rank_0

    def spy(message):
        if message.startswith("saved checkpoint at iteration"):
            seen.append((int(message.split()[4]), read_tracker(save_dir)))
        original(message)

    training.print_rank_0 = spy
    try:
        _run_pretrain(argv)
    finally:
        training.print_rank_0 = original
    return seen


def test_async_save_logs_saved_only_once_complete(tmp_path):
    save = tmp_path / "async"
    argv = shlex.split(f"{MODEL} --train-iters 3 --save {save} --save-interval 1 "
                       "--async-save --ckpt-format torch_dist")
    (seen,) = run_distributed(_async_run_logging_tracker, 1, args=(argv, str(save)))
    assert [it for it, _ in seen] == [1, 2, 3]
    assert all(tracker == it for it, tracker in seen), seen  # the tracker already moved
