"""Ring attention equals full single-process attention (outputs and q/k/v grads).

Both block paths are checked: fused kernels returning their log-sum-exp (the default at
dropout 0) and the explicit float32 block math. With dropout the reference is explicit
math attention whose probabilities are multiplied by the keyed mask of the whole [s, s]
matrix; the ring must reproduce it on every layout.

Tolerance: fp32 everywhere. The ring sums the softmax in a different order (per-block
log-sum-exp merged online) than the reference, so results agree to float32 rounding of
O(1) values accumulated over <= 64 keys: atol 2e-6, rtol 1e-5.
"""


import pytest
import torch
import torch.nn.functional as F

from megacore import parallel_state as ps
from megacore.transformer.context_parallel import (
    attention_dropout_keep_mask,
    get_position_ids_on_cp_rank,
    ring_attention,
    ring_block_plan,
    split_for_cp_rank,
)
from tests.multirank import run_distributed

TOL = dict(atol=2e-6, rtol=1e-5)

# (query heads, key/value heads, causal, dropout): MHA, GQA, MQA, non-causal GQA, and
# GQA with attention dropout (causal and not).
CASES = [(4, 4, True, 0.0), (4, 2, True, 0.0), (4, 1, True, 0.0), (4, 2, False, 0.0),
         (4, 2, True, 0.3), (4, 2, False, 0.3)]
SEED = 1234
# Value head dims other than the query/key head dim 8 (multi-latent attention): narrower
# (values padded inside the ring) and wider (queries and keys padded), causal GQA with and
# without dropout.
VALUE_DIM_CASES = [(6, 0.0), (12, 0.0), (6, 0.3)]


def _inputs(seq, np_, ng, seed, b=2, hn=8, hv=None):
    gen = torch.Generator().manual_seed(seed)
    hv = hn if hv is None else hv
    q = torch.randn(seq, b, np_, hn, generator=gen)
    k = torch.randn(seq, b, ng, hn, generator=gen)
    v = torch.randn(seq, b, ng, hv, generator=gen)
    dout = torch.randn(seq, b, np_, hv, generator=gen)
    return q, k, v, dout


def _math_attention(q, k, v, causal, dropout_p):
    """Explicit attention on [b, n, s, hn] with the keyed dropout mask of the full matrix."""
    b, np_, s, _ = q.shape
    groups = np_ // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1)
    positions = torch.arange(s)
    keep = attention_dropout_keep_mask(SEED, b, torch.arange(np_), positions, positions,
                                       dropout_p)
    return (probs * keep / (1 - dropout_p)) @ v


def _reference(q, k, v, dout, causal, dropout_p=0.0):
    """Full attention (torch SDPA, or math with dropout), [s, b, n, hn] in and out, plus
    q/k/v grads."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    bnsh = [t.permute(1, 2, 0, 3) for t in (q, k, v)]
    if dropout_p:
        out = _math_attention(*bnsh, causal, dropout_p)
    else:
        out = F.scaled_dot_product_attention(*bnsh, is_causal=causal,
                                             enable_gqa=k.size(2) != q.size(2))
    out = out.permute(2, 0, 1, 3)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _ring(q, k, v, dout, causal, cp_group, dropout_p=0.0, head_offset=0, fused=True):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, cp_group=cp_group, causal=causal, dropout_p=dropout_p,
                         dropout_seed=SEED, head_offset=head_offset, fused=fused)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_block_plan_covers_each_visible_pair_once(cp, causal):
    """Simulate the ring on positions: the union of blocks is exactly the mask."""
    seq = 4 * cp
    for rank in range(cp):
        q_pos = get_position_ids_on_cp_rank(seq, cp, rank)
        hits = torch.zeros(seq // cp, seq, dtype=torch.int64)
        for step in range(cp):
            src = (rank - step) % cp
            k_pos = get_position_ids_on_cp_rank(seq, cp, src)
            block = ring_block_plan(step, rank, cp, causal)
            half = seq // cp // 2
            rows = slice(half, None) if block.query == "second" else slice(None)
            cols = slice(None, half) if block.key == "first" else slice(None)
            visible = torch.ones(len(q_pos[rows]), len(k_pos[cols]), dtype=torch.int64)
            if block.causal:
                visible = visible.tril()
            hits[rows][:, k_pos[cols]] += visible  # hits[rows] is a view: writes through
        expected = (q_pos[:, None] >= torch.arange(seq)[None, :]) if causal \
            else torch.ones(seq // cp, seq, dtype=torch.bool)
        assert torch.equal(hits, expected.long()), (rank, hits)


def test_single_process_matches_reference():
    for np_, ng, causal, dropout_p in CASES:
        q, k, v, dout = _inputs(12, np_, ng, seed=np_ + ng)
        for fused in (True, False):
            for got, want in zip(_ring(q, k, v, dout, causal, None, dropout_p, fused=fused),
                                 _reference(q, k, v, dout, causal, dropout_p)):
                torch.testing.assert_close(got, want, **TOL)


def test_value_head_dim_differs_from_key_head_dim():
    for hv, dropout_p in VALUE_DIM_CASES:
        q, k, v, dout = _inputs(12, 4, 2, seed=hv, hv=hv)
        want = _reference(q, k, v, dout, True, dropout_p)
        for fused in (True, False):
            got = _ring(q, k, v, dout, True, None, dropout_p, fused=fused)
            assert got[0].shape == (12, 2, 4, hv) and got[3].shape == v.shape
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("fused", [True, False])
def test_bfloat16_inputs(fused):
    """bf16 in and out; the explicit path computes in fp32, the fused CPU kernel in bf16
    with fp32 accumulation and fp32 merges."""
    q, k, v, dout = _inputs(12, 4, 2, seed=11)
    got = _ring(*(t.bfloat16() for t in (q, k, v, dout)), True, None, fused=fused)
    want = _reference(*(t.bfloat16().float() for t in (q, k, v, dout)), True)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        # bf16 has 8 mantissa bits: one rounding of the output is <= 2**-8 relative
        # (the fused kernel also rounds its probabilities: a few roundings).
        torch.testing.assert_close(g.float(), w, rtol=2 ** -6 if fused else 2 ** -7,
                                   atol=2e-2 if fused else 1e-2)


def _largest_saved(fn):
    """numel of the largest tensor autograd saves while ``fn`` runs."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_fused_ring_saves_no_score_matrix():
    """The fused path keeps q, k/v, out and the LSE: nothing of size s x s per head."""
    s, b, np_ = 64, 2, 4
    q, k, v, _ = _inputs(s, np_, 2, seed=5, b=b)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scores = b * np_ * s * s  # 32768 > q's 4096 elements
    fused = _largest_saved(lambda: ring_attention(q, k, v, cp_group=None, fused=True))
    explicit = _largest_saved(lambda: F.softmax(q.permute(1, 2, 0, 3) @ q.permute(1, 2, 3, 0),
                                                -1))
    assert fused <= q.numel() < scores <= explicit


def test_dropout_mask_is_keyed_and_has_the_right_rate():
    heads, pos = torch.arange(4), torch.arange(64)
    keep = attention_dropout_keep_mask(SEED, 2, heads, pos, pos, 0.25)
    assert keep.shape == (2, 4, 64, 64)
    assert abs(keep.float().mean().item() - 0.75) < 0.01   # 32k samples: sd ~0.0024
    # Any block is the matching slice of the whole: what makes it layout-independent.
    block = attention_dropout_keep_mask(SEED, 2, heads[2:], pos[8:16], pos[40:], 0.25)
    assert torch.equal(block, keep[:, 2:, 8:16, 40:])
    other = attention_dropout_keep_mask(SEED + 1, 2, heads, pos, pos, 0.25)
    assert (other != keep).float().mean() > 0.3


def test_dropout_head_offset_makes_tp_shards_agree():
    """Two tp shards of the heads (with head_offset) equal the unsharded heads."""
    q, k, v, dout = _inputs(12, 4, 2, seed=3)
    full = _ring(q, k, v, dout, True, None, 0.3)
    shards = [_ring(q[:, :, 2 * t:2 * t + 2], k[:, :, t:t + 1], v[:, :, t:t + 1],
                    dout[:, :, 2 * t:2 * t + 2], True, None, 0.3, head_offset=2 * t)
              for t in range(2)]
    for i in range(4):
        torch.testing.assert_close(torch.cat([sh[i] for sh in shards], dim=2), full[i], **TOL)


def _ring_matches_reference(cp):
    ps.initialize_model_parallel(context_parallel_size=cp)
    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    errors = []
    for case, (np_, ng, causal, dropout_p) in enumerate(CASES):
        full = _inputs(8 * cp, np_, ng, seed=100 + case)      # same on every rank
        want = _reference(*full, causal, dropout_p)
        local = [split_for_cp_rank(t, 0, cp, rank) for t in full]   # [s/cp, b, n, hn]
        for fused in ((True, False) if dropout_p == 0.0 else (False,)):
            got = _ring(*local, causal, group, dropout_p, fused=fused)
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
                torch.testing.assert_close(g, split_for_cp_rank(w, 0, cp, rank), **TOL,
                                           msg=lambda m: f"{name} case {case} fused={fused}: {m}")
                errors.append(float((g - split_for_cp_rank(w, 0, cp, rank)).abs().max()))
    for case, (hv, dropout_p) in enumerate(VALUE_DIM_CASES):
        full = _inputs(8 * cp, 4, 2, seed=200 + case, hv=hv)
        want = _reference(*full, True, dropout_p)
        local = [split_for_cp_rank(t, 0, cp, rank) for t in full]
        for fused in ((True, False) if dropout_p == 0.0 else (False,)):
            for g, w in zip(_ring(*local, True, group, dropout_p, fused=fused), want):
                torch.testing.assert_close(g, split_for_cp_rank(w, 0, cp, rank), **TOL,
                                           msg=lambda m: f"hv {hv} fused={fused}: {m}")
    return max(errors)


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_matches_full_attention(cp):
    errors = run_distributed(_ring_matches_reference, cp, args=(cp,))
    assert len(errors) == cp


def _ring_inside_tp_grid():
    """cp=2 inside a tp=2 grid: the ring uses the cp subgroup's global ranks."""
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    full = _inputs(16, 4, 2, seed=7 + ps.get_tensor_model_parallel_rank())
    want = _reference(*full, True)
    got = _ring(*[split_for_cp_rank(t, 0, 2, rank) for t in full], True, group)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, split_for_cp_rank(w, 0, 2, rank), **TOL)
    return True


def test_ring_attention_on_cp_subgroup():
    assert run_distributed(_ring_inside_tp_grid, 4) == [True] * 4


def test_rejects_mismatched_heads():
    q = torch.zeros(4, 1, 3, 8)
    k = torch.zeros(4, 1, 2, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ring_attention(q, k, k, cp_group=None)
    with pytest.raises(ValueError, match=r"value \[s, b, ng, hv\]"):
        ring_attention(k, k, torch.zeros(4, 1, 1, 8), cp_group=None)
