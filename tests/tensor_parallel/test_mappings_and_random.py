"""Each mapping's forward and backward, the RNG tracker, and recompute with dropout."""

import torch
import torch.nn.functional as F

from megacore import parallel_state as ps
from megacore.tensor_parallel import (
    checkpoint,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_rng_tracker,
    model_parallel_manual_seed,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from tests.multirank import run_distributed


def _mapping_pairs():
    """Check forward and backward of every pair against explicit expectations (exact)."""
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = ps.get_tensor_model_parallel_rank()
    base = torch.arange(24, dtype=torch.float32).view(4, 2, 3) + 100 * rank  # differs per rank
    full = torch.cat([torch.arange(24, dtype=torch.float32).view(4, 2, 3) + 100 * r
                      for r in range(2)], dim=0)                                # rank-major [8,2,3]
    both = torch.arange(24, dtype=torch.float32).view(4, 2, 3) * 2 + 100        # sum over ranks

    def run(fn, x, grad):
        x = x.clone().requires_grad_()
        y = fn(x)
        y.backward(grad)
        return y.detach(), x.grad

    y, g = run(copy_to_tensor_model_parallel_region, base, base)
    assert torch.equal(y, base) and torch.equal(g, both)
    y, g = run(reduce_from_tensor_model_parallel_region, base, base)
    assert torch.equal(y, both) and torch.equal(g, base)
    y, g = run(scatter_to_tensor_model_parallel_region, both.repeat(1, 1, 2), both[..., :3])
    assert torch.equal(y, both.repeat(1, 1, 2)[..., 3 * rank:3 * rank + 3])
    assert g.shape == (4, 2, 6)
    y, g = run(gather_from_tensor_model_parallel_region, base, full.view(2, 4, 2, 3).permute(1, 2, 0, 3).reshape(4, 2, 6))
    assert torch.equal(y, torch.cat([base - 100 * rank, base - 100 * rank + 100], dim=-1))
    assert torch.equal(g, base)
    y, g = run(scatter_to_sequence_parallel_region, full, base)
    assert torch.equal(y, base)
    assert g.shape == full.shape
    y, g = run(gather_from_sequence_parallel_region, base, full)
    assert torch.equal(y, full) and torch.equal(g, full.chunk(2)[rank] * 2)
    y, g = run(reduce_scatter_to_sequence_parallel_region, full, base)
    assert torch.equal(y, full.chunk(2)[rank] * 2)
    assert torch.equal(g, full)
    return True


def test_mapping_pairs_on_two_ranks():
    assert run_distributed(_mapping_pairs, 2) == [True, True]


def _tracker_streams():
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_manual_seed(1234)
    tracker = get_rng_tracker()
    default_before = torch.get_rng_state()
    with tracker.fork():
        mp_a = torch.rand(4)
    with tracker.fork("data-parallel-rng"):
        dp_a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), default_before), "fork must not move the default stream"
    with tracker.fork():
        mp_b = torch.rand(4)
    assert not torch.equal(mp_a, mp_b), "a stream continues where it stopped"
    return mp_a, dp_a, torch.rand(4)


def test_tracker_streams_differ_by_tp_rank_only_where_intended():
    (mp0, dp0, d0), (mp1, dp1, d1) = run_distributed(_tracker_streams, 2)
    assert not torch.equal(mp0, mp1), "model-parallel stream differs per tp rank"
    assert torch.equal(dp0, dp1) and torch.equal(d0, d1), "shared streams agree"


def _block(x, w):
    with get_rng_tracker().fork():
        x = F.dropout(x, p=0.5, training=True)
    return F.dropout(torch.tanh(x @ w), p=0.3, training=True)


def _recompute(distribute):
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    results = []
    for use_checkpoint in (False, True):
        model_parallel_manual_seed(99)
        torch.manual_seed(3)
        w = torch.randn(6, 6, requires_grad=True)
        x = torch.randn(4, 6, requires_grad=True)
        y = checkpoint(_block, distribute, x, w) if use_checkpoint else _block(x, w)
        y = _block(y, w)  # a second draw after the checkpoint: streams must have advanced alike
        y.sum().backward()
        results.append((y.detach(), x.grad, w.grad, torch.get_rng_state()))
    (y0, xg0, wg0, s0), (y1, xg1, wg1, s1) = results
    assert torch.equal(y0, y1) and torch.equal(xg0, xg1) and torch.equal(wg0, wg1)
    assert torch.equal(s0, s1), "recompute must leave the streams where they would be"
    return True


def test_recompute_is_bitwise_equal_with_dropout():
    assert run_distributed(_recompute, 2, args=(False,)) == [True, True]
    assert run_distributed(_recompute, 2, args=(True,)) == [True, True]


def test_tracker_rejects_duplicates_and_unknown_streams():
    import pytest
    from megacore.tensor_parallel import RNGStatesTracker
    tracker = RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="seed 1 is already used"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="'a' already exists"):
        tracker.add("a", 2)
    with pytest.raises(KeyError, match="model_parallel_manual_seed"):
        with tracker.fork("missing"):
            pass
