"""A save that fails or dies at any point leaves the previous checkpoint the latest
loadable one: injected exceptions (on one rank, at several points of both formats) and a
process killed with SIGKILL in the middle of a save."""

import datetime
import multiprocessing
import os
import signal
from unittest import mock

import pytest
import torch

from megacore.checkpointing import (
    load_checkpoint,
    read_tracker,
    save_checkpoint,
    verify_checkpoint,
)
from megacore.checkpointing import atomic
from tests.checkpointing import toy_model as toy
from tests.checkpointing.test_dist_checkpoint import _fresh, _reference
from tests.multirank import run_distributed


class _FailOnCall:
    """Wraps a function; raises on its ``n``-th call (1-based) on rank ``rank``."""

    def __init__(self, fn, n, rank):
        self.fn, self.n, self.rank, self.calls = fn, n, rank, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n and torch.distributed.get_rank() == self.rank:
            raise OSError(f"injected failure (call {self.n})")
        return self.fn(*args, **kwargs)


def _injection_points(fmt):
    """(description, patch target, function, failing call, failing rank)."""
    replace, save = atomic.replace_file, torch.save
    points = [("tracker rename on rank 0", "megacore.checkpointing.atomic.replace_file",
               replace, None, 0),
              ("torch.save inside the first file on rank 1", "torch.save", save, 1, 1)]
    if fmt == "torch":
        points.append(("rename of rank 1's model file", "megacore.checkpointing.atomic."
                       "replace_file", replace, 1, 1))
    else:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        points += [("rename of common.pt on rank 0", "megacore.checkpointing.atomic."
                    "replace_file", replace, 2, 0),
                   ("DCP data write on rank 1", "torch.distributed.checkpoint.filesystem."
                    "FileSystemWriter.write_data", FileSystemWriter.write_data, 1, 1)]
    return points


def _fail_saves(path, fmt):
    chunks, opt, sched = _reference(2, 1, None)
    save_checkpoint(1, chunks, opt, sched, save_dir=path, ckpt_format=fmt,
                    consumed_train_samples=8)
    good = toy.flat_state(chunks, opt, sched)
    failures = []
    for i, (what, target, fn, n, rank) in enumerate(_injection_points(fmt)):
        toy.fake_step(chunks, opt, sched)
        # The tracker is the last rename: with rank 0's 2 (legacy) or 3 (dist) renames.
        n = n or (2 if fmt == "torch" else 3)
        with mock.patch(target, _FailOnCall(fn, n, rank)):
            try:
                save_checkpoint(2 + i, chunks, opt, sched, save_dir=path, ckpt_format=fmt,
                                consumed_train_samples=16)
            except BaseException as exc:  # noqa: BLE001 - DCP raises CheckpointException
                failures.append((what, type(exc).__name__))
            else:
                raise AssertionError(f"{what}: the save did not fail")
        assert read_tracker(path) == 1, what
        fresh, opt2, sched2 = _fresh(None)
        assert load_checkpoint(fresh, opt2, sched2, load_dir=path)[0] == 1, what
        toy.assert_states_equal(toy.flat_state(fresh, opt2, sched2), good)
    return failures


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, fmt):
    results = run_distributed(_fail_saves, 2, args=(str(tmp_path), fmt))
    # Every injection point failed the save on *both* ranks (no rank left hanging).
    assert [len(r) for r in results] == [len(_injection_points(fmt))] * 2
    assert {name for r in results for _, name in r} <= {"CheckpointError",
                                                        "CheckpointException"}


def _killed_save(path, fmt, kill_in):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}.store", rank=0,
                                         world_size=1,
                                         timeout=datetime.timedelta(seconds=60))
    chunks, opt, sched = _reference(1, 1, None)
    save_checkpoint(1, chunks, opt, sched, save_dir=path, ckpt_format=fmt,
                    consumed_train_samples=8)
    toy.fake_step(chunks, opt, sched)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_in == "tracker":
        target = "megacore.checkpointing.save_load.write_tracker"
    elif kill_in == "torch.save":
        target = "torch.save"
        real_save = torch.save

        def die(obj, f, *args, **kwargs):  # noqa: F811 - half a file, then death
            real_save(obj, f)
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    else:
        target = "torch.distributed.checkpoint.filesystem.FileSystemWriter.write_data"
    with mock.patch(target, die):
        save_checkpoint(2, chunks, opt, sched, save_dir=path, ckpt_format=fmt,
                        consumed_train_samples=16)
    os._exit(3)  # not reached if the kill happened


def _load_latest(path):
    toy.setup(1, 1)
    fresh, opt, sched = _fresh(None)
    return load_checkpoint(fresh, opt, sched, load_dir=path)[:2]


@pytest.mark.parametrize("fmt,kill_in", [("torch", "torch.save"), ("torch", "tracker"),
                                         ("torch_dist", "dcp write"),
                                         ("torch_dist", "torch.save")])
def test_killed_save_keeps_previous_checkpoint(tmp_path, fmt, kill_in):
    path = str(tmp_path / "ckpt")
    proc = multiprocessing.get_context("fork").Process(target=_killed_save,
                                                       args=(path, fmt, kill_in))
    proc.start()
    proc.join(timeout=120)
    if proc.is_alive():
        proc.kill()
        raise AssertionError("the saving process hung")
    assert proc.exitcode == -signal.SIGKILL
    assert read_tracker(path) == 1
    assert verify_checkpoint(path) == []
    assert run_distributed(_load_latest, 1, args=(path,)) == [(1, 8)]
