"""Asynchronous saves equal synchronous ones, even when training changes the params right
after the save returns; the tracker moves only at finalization."""

import glob
import os

import torch

from megacore.checkpointing import (
    finalize_async_saves,
    has_pending_async_save,
    read_tracker,
    save_checkpoint,
)
from megacore.checkpointing.dist_checkpoint import list_tensors, read_full_tensors
from tests.checkpointing import toy_model as toy
from tests.checkpointing.test_dist_checkpoint import _reference
from tests.multirank import run_distributed


def _sync_and_async(root):
    chunks, opt, sched = _reference(2, 2, None)
    for fmt in ("torch", "torch_dist"):
        kw = dict(ckpt_format=fmt, consumed_train_samples=40, config_dict={"fmt": fmt})
        torch.manual_seed(5)  # the same RNG state in both saves
        save_checkpoint(5, chunks, opt, sched, save_dir=f"{root}/{fmt}-sync", **kw)
        torch.manual_seed(5)
        save_checkpoint(5, chunks, opt, sched, save_dir=f"{root}/{fmt}-async",
                        async_save=True, **kw)
        assert has_pending_async_save()
        pending_tracker = read_tracker(f"{root}/{fmt}-async")
        toy.fake_step(chunks, opt, sched)  # training goes on while the files are written
        assert finalize_async_saves(blocking=True)
        assert read_tracker(f"{root}/{fmt}-async") == 5
        # A later save finalizes a pending one first.
        save_checkpoint(6, chunks, opt, sched, save_dir=f"{root}/{fmt}-async",
                        async_save=True, **kw)
        save_checkpoint(7, chunks, opt, sched, save_dir=f"{root}/{fmt}-async", **kw)
        assert read_tracker(f"{root}/{fmt}-async") == 7 and not has_pending_async_save()
        assert pending_tracker is None
    return True


def _assert_same(a, b, where):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, (where, a, b)


def test_async_save_equals_sync_save(tmp_path):
    assert run_distributed(_sync_and_async, 4, args=(str(tmp_path),)) == [True] * 4
    sync_files = sorted(glob.glob(f"{tmp_path}/torch-sync/iter_0000005/*/*.pt"))
    assert len(sync_files) == 4
    for path in sync_files:
        other = path.replace("torch-sync", "torch-async")
        _assert_same(torch.load(path, weights_only=True), torch.load(other, weights_only=True),
                     os.path.basename(os.path.dirname(path)))
    sync_dir = f"{tmp_path}/torch_dist-sync/iter_0000005"
    async_dir = f"{tmp_path}/torch_dist-async/iter_0000005"
    keys = [k for k, _, _ in list_tensors(sync_dir)]
    assert keys == [k for k, _, _ in list_tensors(async_dir)] and len(keys) > 50
    _assert_same(read_full_tensors(sync_dir, keys), read_full_tensors(async_dir, keys), "dcp")
    _assert_same(torch.load(f"{sync_dir}/common.pt", weights_only=True),
                 torch.load(f"{async_dir}/common.pt", weights_only=True), "common")
    for rank in range(4):
        rel = f"rng/rank_{rank:05d}.pt"
        _assert_same(torch.load(f"{sync_dir}/{rel}", weights_only=True),
                     torch.load(f"{async_dir}/{rel}", weights_only=True), rel)
