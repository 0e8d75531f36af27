"""The gloo group of asynchronous saves belongs to one world: after
destroy_process_group and a new init, a new group is made (a stale one fails or hangs)."""

import os
import tempfile

import torch
import torch.distributed as dist

from megacore.checkpointing import async_save
from megacore.checkpointing.parallel_layout import current_rank_layout
from tests.multirank import run_distributed


def _group_works(group) -> float:
    value = torch.ones(1)
    dist.all_reduce(value, group=group)
    return float(value)


def _new_world_new_group():
    first = async_save.async_process_group(current_rank_layout())
    assert _group_works(first) == 1.0
    assert async_save.async_process_group(current_rank_layout()) is first  # cached
    dist.destroy_process_group()
    store = os.path.join(tempfile.mkdtemp(prefix="megacore-async-"), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    second = async_save.async_process_group(current_rank_layout())
    assert second is not first, "the group of the destroyed world was reused"
    return _group_works(second)


def test_async_group_does_not_outlive_its_world():
    assert run_distributed(_new_world_new_group, 1, timeout=60) == [1.0]
