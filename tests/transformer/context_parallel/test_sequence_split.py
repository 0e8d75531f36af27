"""Zigzag split helpers: layout, round trips and the cp all-gather."""

import pytest
import torch

from megacore import parallel_state as ps
from megacore.transformer.context_parallel import (
    cp_chunk_ids,
    gather_from_context_parallel_ranks,
    get_batch_on_this_cp_rank,
    get_position_ids_on_cp_rank,
    merge_batch_from_cp_ranks,
    merge_cp_shards,
    split_for_cp_rank,
)
from tests.multirank import run_distributed


def test_chunk_ids_and_positions_match_worked_example():
    assert [cp_chunk_ids(2, r) for r in range(2)] == [(0, 3), (1, 2)]
    assert [cp_chunk_ids(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert get_position_ids_on_cp_rank(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert get_position_ids_on_cp_rank(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_positions_cover_sequence_once_and_balance_causal_work(cp):
    s = 8 * cp
    positions = [get_position_ids_on_cp_rank(s, cp, r) for r in range(cp)]
    assert torch.equal(torch.cat(positions).sort().values, torch.arange(s))
    # Causal work of a token at position p is p + 1 keys: equal on every rank.
    work = {int((p + 1).sum()) for p in positions}
    assert len(work) == 1


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("seq_dim", [0, 1, 2])
def test_split_then_merge_round_trips(cp, seq_dim):
    shape = [3, 5, 7]
    shape[seq_dim] = 4 * cp
    x = torch.randn(shape)
    shards = [split_for_cp_rank(x, seq_dim, cp, r) for r in range(cp)]
    for rank, shard in enumerate(shards):
        assert shard.is_contiguous()
        index = get_position_ids_on_cp_rank(4 * cp, cp, rank)
        assert torch.equal(shard, x.index_select(seq_dim, index))
    assert torch.equal(merge_cp_shards(shards, seq_dim), x)


def test_split_rejects_indivisible_sequence():
    with pytest.raises(ValueError, match="divisible by 2 \\* context_parallel_size"):
        split_for_cp_rank(torch.zeros(2, 6), 1, 2, 0)


def test_batch_split_and_merge_round_trip():
    b, s, cp = 2, 16, 4
    tokens = torch.randint(0, 100, (b, s))
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.rand(b, s),
             "attention_mask": torch.rand(b, 1, s, s) > 0.5, "extra": torch.ones(3)}
    locals_ = [get_batch_on_this_cp_rank(batch, cp, r) for r in range(cp)]
    for rank, local in enumerate(locals_):
        assert local["tokens"].shape == (b, s // cp)
        assert local["attention_mask"].shape == (b, 1, s // cp, s)   # queries only
        assert local["extra"] is batch["extra"]
        expected = get_position_ids_on_cp_rank(s, cp, rank).expand(b, -1)
        assert torch.equal(local["position_ids"], expected)            # added: global
        assert torch.equal(local["labels"], local["tokens"] + 1)
    merged = merge_batch_from_cp_ranks(locals_)
    for key in ("tokens", "labels", "loss_mask", "attention_mask"):
        assert torch.equal(merged[key], batch[key]), key
    assert torch.equal(merged["position_ids"], torch.arange(s).expand(b, -1))


def _gather_check(cp):
    ps.initialize_model_parallel(context_parallel_size=cp)
    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    x = torch.arange(2 * 8 * cp * 3, dtype=torch.float32).view(2, 8 * cp, 3)
    local = split_for_cp_rank(x, 1, cp, rank)
    return torch.equal(gather_from_context_parallel_ranks(local, 1, group), x)


def test_gather_from_context_parallel_ranks():
    assert run_distributed(_gather_check, 4, args=(4,)) == [True] * 4
