"""Pure pieces: rotary embeddings, QKV layout, sharded dropout, init scopes, module specs."""

import pytest
import torch

from megacore.transformer import (
    IdentityOp,
    ModuleSpec,
    RotaryEmbedding,
    apply_rotary_pos_emb,
    build_module,
    init_rng_scope,
)
from megacore.transformer.dropout import sharded_dropout
from megacore.transformer.qkv_layout import collapse_qkv_rows, expand_qkv_rows


# -- rotary ---------------------------------------------------------------------------------
def _complex_rope(x, positions, base=10000.0):
    """Reference: rotate channel pairs (2i, 2i+1) as complex numbers."""
    d = x.size(-1)
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv  # [s, d/2]
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    z = z * torch.polar(torch.ones_like(angles), angles)[:, None, None, :]
    return torch.view_as_real(z).reshape(x.shape).float()


def test_interleaved_rope_matches_complex_rotation():
    x = torch.randn(6, 2, 3, 8)
    rope = RotaryEmbedding(8, rotary_interleaved=True)
    out = apply_rotary_pos_emb(x, rope(6), rotary_interleaved=True)
    # fp32 cos/sin vs float64 reference: differences ~1e-7.
    torch.testing.assert_close(out, _complex_rope(x, torch.arange(6)), rtol=1e-5, atol=1e-5)


def test_half_rope_is_interleaved_rope_on_permuted_channels():
    x = torch.randn(6, 2, 3, 8)
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # halves layout -> pairs layout
    half = apply_rotary_pos_emb(x, RotaryEmbedding(8)(6))
    inter = apply_rotary_pos_emb(x[..., perm], RotaryEmbedding(8, rotary_interleaved=True)(6),
                                 rotary_interleaved=True)
    torch.testing.assert_close(half[..., perm], inter, rtol=1e-6, atol=1e-6)


def test_partial_rope_passes_the_rest_and_positions_match_offsets():
    x = torch.randn(5, 2, 1, 8)
    rope = RotaryEmbedding(8, rotary_percent=0.5)
    out = apply_rotary_pos_emb(x, rope(5))
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert not torch.allclose(out[1:, ..., :4], x[1:, ..., :4])
    positions = torch.arange(3, 8).expand(2, 5)
    torch.testing.assert_close(rope.for_positions(positions)[:, :1], rope(5, offset=3))


def test_relative_position_property():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        fi, fj = rope(1, offset=i), rope(1, offset=j)
        return (apply_rotary_pos_emb(q, fi) * apply_rotary_pos_emb(k, fj)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10), rtol=1e-5, atol=1e-5)


# -- QKV layout -----------------------------------------------------------------------------
def test_qkv_expand_worked_example():
    # Module docstring: np=4, ng=1, hn=1, tp=2: [q0 q1 q2 q3 k v] -> [q0 q1 k v | q2 q3 k v]
    logical = torch.tensor([0.0, 1, 2, 3, 10, 20])
    out = expand_qkv_rows(logical, num_attention_heads=4, num_query_groups=1, kv_channels=1,
                          tp_size=2)
    assert out.tolist() == [0, 1, 10, 20, 2, 3, 10, 20]


@pytest.mark.parametrize("np_, ng, tp", [(8, 2, 4), (8, 1, 8), (8, 4, 2), (4, 4, 4), (6, 3, 3)])
def test_qkv_expand_collapse_round_trip(np_, ng, tp):
    hn, h = 3, 5
    logical = torch.randn(ng * (np_ // ng + 2) * hn, h)
    layout = dict(num_attention_heads=np_, num_query_groups=ng, kv_channels=hn, tp_size=tp)
    expanded = expand_qkv_rows(logical, **layout)
    assert expanded.size(0) == max(ng, tp) * (np_ // max(ng, tp) + 2) * hn
    assert torch.equal(collapse_qkv_rows(expanded, **layout), logical)


# -- sharded dropout ------------------------------------------------------------------------
@pytest.mark.parametrize("dim, shards", [(0, 2), (1, 4)])
def test_sharded_dropout_slices_the_full_mask(dim, shards):
    x = torch.randn(8, 8, 3)
    torch.manual_seed(3)
    full = sharded_dropout(x, 0.5, True)
    size = x.size(dim) // shards
    for r in range(shards):
        torch.manual_seed(3)
        part = sharded_dropout(x.narrow(dim, r * size, size), 0.5, True, dim=dim,
                               full_size=x.size(dim), start=r * size)
        assert torch.equal(part, full.narrow(dim, r * size, size))
    assert (full == 0).any() and torch.equal(sharded_dropout(x, 0.5, False), x)


# -- init scopes ----------------------------------------------------------------------------
def test_init_rng_scope_is_keyed_and_leaves_the_stream_alone():
    torch.manual_seed(9)
    with init_rng_scope("layer.3"):
        a = torch.randn(4)
    after = torch.randn(4)
    torch.manual_seed(9)
    torch.randn(100)  # a different position in the stream does not change the scope
    with init_rng_scope("layer.3"):
        b = torch.randn(4)
    with init_rng_scope("layer.4"):
        c = torch.randn(4)
    torch.manual_seed(9)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.randn(4), after) and torch.initial_seed() == 9


# -- specs ----------------------------------------------------------------------------------
class _Thing(torch.nn.Module):
    def __init__(self, width, scale=1.0, submodules=None):
        super().__init__()
        self.width, self.scale, self.submodules = width, scale, submodules


def test_build_module_merges_params_and_submodules():
    spec = ModuleSpec(module=_Thing, params={"scale": 2.0}, submodules="parts")
    built = build_module(spec, 3)
    assert (built.width, built.scale, built.submodules) == (3, 2.0, "parts")
    assert build_module(spec, 3, scale=5.0).scale == 5.0  # the caller's kwargs win
    lazy = ModuleSpec(module=("torch.nn", "Identity"))
    assert isinstance(build_module(lazy), torch.nn.Identity)
    assert build_module(None) is None
    x = torch.ones(2)
    assert build_module(IdentityOp, 1, a=2)(x) is x
    with pytest.raises(TypeError, match="_Thing"):
        build_module(spec)  # missing width
