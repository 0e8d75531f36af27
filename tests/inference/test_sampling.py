"""Sampling without a model: filters, greedy, seeded draws, parameter checks."""

import math

import pytest
import torch

from megacore.inference import SamplingParams, filter_logits, make_generator, sample_next_tokens


def _logits():
    # Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 (exact in float).
    return torch.log(torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.0625]))


def test_top_k_keeps_the_k_most_likely():
    kept = torch.isfinite(filter_logits(_logits(), 1.0, 2, 0.0))
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 < 0.7 -> also 0.25 (0.75 >= 0.7) -> stop.
    kept = torch.isfinite(filter_logits(_logits(), 1.0, 0, 0.7))
    assert kept.tolist() == [False, True, False, True, False]
    # A tiny top_p keeps only the most likely token; top_p=0 or 1 keeps everything.
    assert torch.isfinite(filter_logits(_logits(), 1.0, 0, 1e-6)).sum() == 1
    # A decayed top_p below float32's range still keeps the most likely token.
    assert torch.isfinite(filter_logits(_logits(), 1.0, 0, 1e-60)).tolist() == [
        False, True, False, False, False]
    assert torch.isfinite(filter_logits(_logits(), 1.0, 0, 0.0)).all()
    assert torch.isfinite(filter_logits(_logits(), 1.0, 0, 1.0)).all()


def test_temperature_scales_logits():
    torch.testing.assert_close(filter_logits(_logits(), 0.5, 0, 0.0), _logits() / 0.5)


def test_greedy_rows_take_argmax_and_draw_nothing():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    gens = [make_generator(SamplingParams(seed=1)) for _ in range(3)]
    before = [g.get_state().clone() for g in gens]
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1),
              SamplingParams(temperature=0.0, top_p=0.5)]
    tokens = sample_next_tokens(logits, params, gens, [0, 0, 0])
    assert tokens == logits.argmax(-1).tolist()
    assert all(torch.equal(b, g.get_state()) for b, g in zip(before, gens))


def test_seeded_draws_repeat_and_follow_the_distribution():
    logits = _logits().unsqueeze(0)
    params = [SamplingParams(temperature=1.0, seed=42)]

    def draws(seed, n):
        gen = make_generator(SamplingParams(seed=seed))
        return [sample_next_tokens(logits, params, [gen], [0])[0] for _ in range(n)]

    assert draws(42, 50) == draws(42, 50)
    assert draws(42, 50) != draws(43, 50)
    counts = torch.bincount(torch.tensor(draws(7, 4000)), minlength=5).double() / 4000
    # 4000 draws: the standard error of a frequency is <= 0.008; allow ~4 sigma.
    torch.testing.assert_close(counts, _logits().exp().double(), atol=0.035, rtol=0)


def test_one_row_never_consumes_another_rows_stream():
    logits = torch.randn(2, 9, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=1.0)
    alone = make_generator(SamplingParams(seed=5))
    expected = [sample_next_tokens(logits[1:], [p], [alone], [0])[0] for _ in range(20)]
    g0, g1 = make_generator(SamplingParams(seed=9)), make_generator(SamplingParams(seed=5))
    batched = [sample_next_tokens(logits, [p, p], [g0, g1], [0, 0])[1] for _ in range(20)]
    assert batched == expected


def test_top_p_decay_and_bound():
    p = SamplingParams(top_p=0.8, top_p_decay=0.5, top_p_bound=0.3)
    assert [p.top_p_at(i) for i in range(4)] == [0.8, 0.4, 0.3, 0.3]
    assert SamplingParams(top_p=0.8).top_p_at(5) == 0.8
    assert math.isclose(SamplingParams(top_p=0.8, top_p_decay=0.5).top_p_at(2), 0.2)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=101.0), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=1.5), "top_p"),
    (dict(top_p_decay=2.0), "top_p_decay"), (dict(top_p_decay=0.5), "top_p_decay"),
    (dict(top_p=0.5, top_p_bound=-1.0), "top_p_bound"), (dict(seed=-3), "seed"),
])
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
