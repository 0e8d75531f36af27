"""Attention backends (``--attention-backend``) against the explicit reference.

At attention dropout 0 every backend that runs on this device (auto, fused, unfused,
local) gives the reference's output and q/k/v gradients; the kernels sum in different
orders, so fp32 agreement is to rounding of O(1) values over <= 16 keys: 1e-5.

With dropout, the fused default draws its mask inside the kernel. Its statistics are
checked (keep rate, 1/(1-p) scaling), and so is its gradient: the mask is read back by
attending with identity values and the explicit math with that mask must give the
kernel's output and gradients. The opt-in layout-independent mask is compared across
layouts in tests/models and tests/transformer/context_parallel.

Backends the device cannot run fail with a message naming the flag.
"""

import pytest
import torch

from megacore import parallel_state as ps
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import AttnBackend, AttnMaskType, DotProductAttention, TransformerConfig
from tests.multirank import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)
S, B, NP, HN = 16, 2, 4, 8


def _config(**kw):
    base = dict(num_layers=2, hidden_size=NP * HN, num_attention_heads=NP,
                attention_dropout=0.0, hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _inputs(ng, seed, hn=HN, s=S):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, B, NP, hn, generator=g)
    k = torch.randn(s, B, ng, hn, generator=g)
    v = torch.randn(s, B, ng, hn, generator=g)
    dout = torch.randn(s, B, NP * hn, generator=g)
    return q, k, v, dout


def _run(attn, q, k, v, dout, mask=None, mask_type=None):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = attn(q, k, v, mask, attn_mask_type=mask_type)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _backends_match_reference():
    ps.initialize_model_parallel()
    padding = torch.zeros(B, 1, S, S, dtype=torch.bool)
    padding[1, ..., 12:] = True  # batch row 1: the last four keys are padding
    compared = 0
    for ng in (4, 2):
        q, k, v, dout = _inputs(ng, seed=ng)
        for mask_type in (AttnMaskType.causal, AttnMaskType.padding,
                          AttnMaskType.padding_causal, AttnMaskType.no_mask):
            ref_attn = DotProductAttention(
                _config(num_query_groups=ng, attention_backend=AttnBackend.unfused), 1)
            want = _run(ref_attn, q, k, v, dout, padding, mask_type)
            for backend in (AttnBackend.auto, AttnBackend.fused, AttnBackend.local):
                attn = DotProductAttention(
                    _config(num_query_groups=ng, attention_backend=backend), 1)
                got = _run(attn, q, k, v, dout, padding, mask_type)
                for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
                    torch.testing.assert_close(
                        g, w, **TOL, msg=lambda m: f"{backend} ng={ng} {mask_type} {name}: {m}")
                compared += 1
    return compared


def test_each_backend_matches_unfused_at_dropout_0():
    assert run_distributed(_backends_match_reference, 1) == [2 * 4 * 3]


def _dropout_mask_and_grads(p):
    """Read the kernel's mask back with identity values, then check out and grads."""
    ps.initialize_model_parallel()
    cfg = _config(attention_dropout=p)
    attn = DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.no_mask)
    attn.train()
    # q = k = 0: uniform probabilities 1/S; values = identity (hn = S) => out[i, j] =
    # keep[i, j] / (1 - p) / S.
    zeros = torch.zeros(S, B, NP, S)
    eye = torch.eye(S).view(S, 1, 1, S).expand(S, B, NP, S)
    model_parallel_manual_seed(5)
    probe = attn(zeros, zeros, eye).view(S, B, NP, S).permute(1, 2, 0, 3)  # [b, n, sq, sk]
    scaled = probe * S * (1 - p)
    keep = scaled > 0.5
    assert torch.allclose(scaled, keep.float(), atol=1e-5)  # only 0 or 1/(1-p) per element
    # The same stream state draws the same mask for any values of the same shape.
    q, k, v, dout = _inputs(NP, seed=3, hn=S)
    model_parallel_manual_seed(5)
    got = _run(attn, q, k, v, dout, mask_type=AttnMaskType.no_mask)
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    bnsh = [t.permute(1, 2, 0, 3) for t in (q2, k2, v2)]
    probs = (bnsh[0] @ bnsh[1].transpose(-1, -2) * attn.softmax_scale).softmax(-1)
    out = (probs * keep / (1 - p)) @ bnsh[2]
    out = out.permute(2, 0, 1, 3).reshape(S, B, NP * S)
    out.backward(dout)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, (out.detach(), q2.grad, k2.grad,
                                                              v2.grad)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{name}: {m}")
    # A second forward (next step) draws another mask; eval mode draws none.
    again = attn(zeros, zeros, eye).view(S, B, NP, S).permute(1, 2, 0, 3)
    attn.eval()
    evaluated = attn(zeros, zeros, eye)
    return keep.float().mean().item(), bool(torch.equal(again, probe)), \
        bool(torch.allclose(evaluated, torch.full_like(evaluated, 1.0 / S)))


def test_fused_dropout_keep_rate_scaling_and_gradients():
    rate, repeated, eval_clean = run_distributed(_dropout_mask_and_grads, 1, args=(0.25,))[0]
    # 2 * 4 * 16 * 16 = 2048 Bernoulli(0.75) draws: sd 0.0096; 4 sd.
    assert abs(rate - 0.75) < 0.04, rate
    assert not repeated
    assert eval_clean


def _errors():
    ps.initialize_model_parallel()
    messages = {}
    try:
        DotProductAttention(_config(attention_backend=AttnBackend.flash), 1)
    except ValueError as e:
        messages["flash"] = str(e)
    attn = DotProductAttention(_config(attention_backend=AttnBackend.fused,
                                       attention_dropout=0.1), 1).train()
    q, k, v, _ = _inputs(NP, seed=0)
    try:
        attn(q, k, v, None)
    except RuntimeError as e:
        messages["fused_dropout"] = str(e)
    attn.eval()  # no dropout in eval: the fused CPU kernel runs
    messages["fused_eval_shape"] = tuple(attn(q, k, v, None).shape)
    return messages


def test_backends_the_device_cannot_run_name_the_flag():
    messages = run_distributed(_errors, 1)[0]
    assert "--attention-backend flash" in messages["flash"]
    assert "CUDA" in messages["flash"]
    assert "--attention-backend fused" in messages["fused_dropout"]
    assert "dropout 0.1" in messages["fused_dropout"]
    assert messages["fused_eval_shape"] == (S, B, NP * HN)


def test_layout_independent_dropout_excludes_fused_only_backends():
    with pytest.raises(ValueError, match="layout_independent_attention_dropout.*flash"):
        _config(attention_backend=AttnBackend.flash, attention_dropout=0.1,
                layout_independent_attention_dropout=True)
    _config(attention_backend=AttnBackend.fused, layout_independent_attention_dropout=True)
