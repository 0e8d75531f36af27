"""Activation recompute with distributed saved activations splits over the tp group it
is given (a module's pg_collection), not over parallel_state's default, in forward and in
backward, and gives the same gradients as no recompute."""

import torch
import torch.distributed as dist

from megacore import parallel_state as ps
from megacore.tensor_parallel import checkpoint
from tests.multirank import run_distributed


def _layer(x, w):
    return torch.tanh(x @ w) * 2


def _saved_and_grads(tp_group):
    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(6, 6, requires_grad=True)
    out = checkpoint(_layer, True, x, w, tp_group=tp_group)
    saved = out.grad_fn.saved_tensors[0].numel()  # this rank's share of x
    out.sum().backward()
    return saved, x.grad.clone(), w.grad.clone()


def _check():
    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(6, 6, requires_grad=True)
    _layer(x, w).sum().backward()
    expected = (x.grad, w.grad)
    world = dist.new_group([0, 1])
    ps.initialize_model_parallel(tensor_model_parallel_size=1)  # default tp group: 1 rank
    try:
        saved, gx, gw = _saved_and_grads(world)  # explicit tp group of 2 ranks
        assert saved == 24 // 2, "not split over the explicit group"
        torch.testing.assert_close((gx, gw), expected, rtol=0, atol=0)
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=2)  # default tp group: 2
        singles = [dist.new_group([r]) for r in range(2)]  # every rank creates every group
        saved, gx, gw = _saved_and_grads(singles[dist.get_rank()])  # explicit: 1 rank
        assert saved == 24, "split over the default group despite an explicit one"
        torch.testing.assert_close((gx, gw), expected, rtol=0, atol=0)
    finally:
        ps.destroy_model_parallel()
    return True


def test_recompute_uses_the_explicit_tp_group():
    run_distributed(_check, 2, timeout=60)
