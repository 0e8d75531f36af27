"""The aux-loss gradient scale is per router, passed at forward time: two models in one
process keep their own scales, and the deprecated class-wide setter cannot change them."""

import pytest
import torch

from megacore.deprecation import MegacoreDeprecationWarning
from megacore.transformer.moe import MoEAuxLossAutoScaler, set_moe_aux_loss_scale


class _Router(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.aux_loss_scale = 1.0


def _aux_grad(scale):
    w = torch.tensor([1.5], requires_grad=True)
    x = torch.ones(2, requires_grad=True)
    out = MoEAuxLossAutoScaler.apply(x * 2, w * w, scale)  # d(w^2)/dw = 2w = 3
    out.sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 2.0))  # the activation's grad is untouched
    return float(w.grad)


def test_each_call_uses_its_own_scale():
    assert _aux_grad(0.5) == pytest.approx(1.5)
    assert _aux_grad(2.0) == pytest.approx(6.0)


def test_set_moe_aux_loss_scale_touches_one_model_only():
    model_a = torch.nn.Sequential(_Router(), torch.nn.Linear(2, 2), _Router())
    model_b = torch.nn.Sequential(_Router())
    assert set_moe_aux_loss_scale([model_a], 0.25) == 2
    assert [m.aux_loss_scale for m in model_a if isinstance(m, _Router)] == [0.25, 0.25]
    assert model_b[0].aux_loss_scale == 1.0


def test_the_deprecated_global_setter_warns_and_leaves_explicit_scales_alone():
    try:
        with pytest.warns(MegacoreDeprecationWarning, match="set_moe_aux_loss_scale"):
            MoEAuxLossAutoScaler.set_loss_scale(8.0)
        assert _aux_grad(0.5) == pytest.approx(1.5)
        assert _aux_grad(None) == pytest.approx(24.0)  # no scale given: the old default
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)


def _real_router_scales_its_aux_gradient():
    from megacore import parallel_state as ps
    from megacore.transformer.moe.router import TopKRouter
    from tests.transformer.moe.moe_testing import make_config

    ps.initialize_model_parallel()
    cfg = make_config(moe_aux_loss_coeff=0.1, num_moe_experts=4)
    grads = []
    for scale in (1.0, 0.25):
        torch.manual_seed(3)
        router = TopKRouter(cfg)
        assert set_moe_aux_loss_scale(torch.nn.ModuleList([router]), scale) == 1
        probs = router(torch.randn(3, 2, 8)).probs
        (probs * 0).sum().backward()  # only the aux loss reaches the weight
        grads.append(router.weight.grad.clone())
    ps.destroy_model_parallel()
    torch.testing.assert_close(grads[1], 0.25 * grads[0], rtol=1e-6, atol=0)
    return True


def test_a_real_router_uses_the_scale_set_on_it():
    from tests.multirank import run_distributed

    assert run_distributed(_real_router_scales_its_aux_gradient, 1, timeout=60) == [True]
