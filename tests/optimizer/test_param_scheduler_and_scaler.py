"""Learning-rate / weight-decay curves against closed-form values, scheduler checkpoints,
dynamic loss scaler sequences, config validation, param groups. Pure logic."""

import math

import pytest
import torch

from megacore.optimizer import (
    DynamicGradScaler,
    OptimizerConfig,
    OptimizerParamScheduler,
    get_param_groups,
)

MAX, MIN, INIT, W, D = 1.0, 0.1, 0.01, 10, 110


class _Opt:
    """Anything with param_groups works; two groups check lr_mult / wd_mult / overrides."""

    def __init__(self):
        self.param_groups = [{"lr_mult": 1.0, "wd_mult": 1.0},
                             {"lr_mult": 0.5, "wd_mult": 0.0, "max_lr": 2.0, "min_lr": 0.0}]


def _scheduler(style, **kw):
    args = dict(init_lr=INIT, max_lr=MAX, min_lr=MIN, lr_warmup_steps=W, lr_decay_steps=D,
                lr_decay_style=style, start_wd=0.0, end_wd=0.1, wd_incr_steps=50,
                wd_incr_style="linear")
    args.update(kw)
    return OptimizerParamScheduler(_Opt(), **args)


def _closed_form(style, n, max_lr=MAX, min_lr=MIN, wsd=None):
    if n <= W:
        return INIT + (max_lr - INIT) * n / W
    if style == "constant":
        return max_lr
    if n > D:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, max_lr * math.sqrt(W) / math.sqrt(n))
    r = (n - W) / (D - W)
    if style == "linear":
        c = 1 - r
    elif style == "cosine":
        c = 0.5 * (1 + math.cos(math.pi * r))
    else:  # WSD, linear anneal over the last `wsd` steps
        c = 1.0 if n <= D - wsd else 1 - (n - (D - wsd)) / wsd
    return min_lr + c * (max_lr - min_lr)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root", "WSD"])
def test_lr_curves_match_closed_form(style):
    extra = dict(wsd_decay_steps=20, lr_wsd_decay_style="linear") if style == "WSD" else {}
    sched = _scheduler(style, **extra)
    for n in range(0, 130):
        g0, g1 = sched.optimizer.param_groups
        assert g0["lr"] == pytest.approx(_closed_form(style, n, wsd=20), abs=1e-12), n
        assert g1["lr"] == pytest.approx(0.5 * _closed_form(style, n, 2.0, 0.0, wsd=20),
                                         abs=1e-12), n
        sched.step(1)


def test_wsd_anneal_styles_and_weight_decay_curves():
    for style, coeff in [("cosine", lambda q: 0.5 * (1 + math.cos(math.pi * q))),
                         ("exponential", lambda q: 2 * 0.5 ** q - 1),
                         ("minus_sqrt", lambda q: 1 - math.sqrt(q))]:
        sched = _scheduler("WSD", wsd_decay_steps=20, lr_wsd_decay_style=style)
        sched.step(100)  # q = (100 - 90) / 20
        expect = MIN + coeff(0.5) * (MAX - MIN)
        assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(expect)
    for style, coeff in [("linear", lambda r: r),
                         ("cosine", lambda r: 0.5 * (1 + math.cos(math.pi * (1 - r))))]:
        sched = _scheduler("linear", wd_incr_style=style)
        for n in (0, 20, 35, 50, 70):
            sched.step(n - sched.num_steps)
            expect = 0.1 if n > 50 else 0.1 * coeff(n / 50)
            assert sched.get_wd() == pytest.approx(expect), (style, n)
            assert sched.optimizer.param_groups[0]["weight_decay"] == pytest.approx(expect)
            assert sched.optimizer.param_groups[1]["weight_decay"] == 0.0  # wd_mult 0


def test_scheduler_state_dict_round_trip_and_conflicts():
    sched = _scheduler("cosine")
    sched.step(37)
    fresh = _scheduler("cosine")
    fresh.load_state_dict(sched.state_dict())
    assert fresh.num_steps == 37
    assert fresh.optimizer.param_groups[0]["lr"] == sched.optimizer.param_groups[0]["lr"]
    strict = _scheduler("cosine", max_lr=0.5, use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match="max_lr"):
        strict.load_state_dict(sched.state_dict())
    keep = _scheduler("cosine", max_lr=0.5, use_checkpoint_opt_param_scheduler=False,
                      override_opt_param_scheduler=True)
    keep.load_state_dict(sched.state_dict())
    assert keep.max_lr == 0.5 and keep.num_steps == 37
    with pytest.raises(ValueError, match="lr_decay_style"):
        _scheduler("exotic")


def test_dynamic_scaler_hysteresis_backoff_and_growth():
    scaler = DynamicGradScaler(initial_scale=1024.0, min_scale=256.0, growth_factor=2.0,
                               backoff_factor=0.5, growth_interval=3, hysteresis=2)
    seq = []
    for found_inf in [True, True, True, False, False, False, True, True, True, True]:
        scaler.update(found_inf)
        seq.append(float(scaler.scale))
    # 1st inf absorbed by hysteresis; afterwards each inf halves (floored at 256) until 3
    # clean steps double it and restore the hysteresis.
    assert seq == [1024, 512, 256, 256, 256, 512, 512, 256, 256, 256]
    state = scaler.state_dict()
    other = DynamicGradScaler(8.0, 1.0, 2.0, 0.5, 3, 2)
    other.load_state_dict(state)
    assert float(other.scale) == 256 and other._hysteresis_tracker == scaler._hysteresis_tracker


def test_optimizer_config_validation_and_param_groups():
    with pytest.raises(ValueError, match="optimizer"):
        OptimizerConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="clip_grad"):
        OptimizerConfig(clip_grad=-1.0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = get_param_groups([model], OptimizerConfig(lr=0.1, weight_decay=0.2),
                              scale_lr_cond=lambda name, p: name.startswith("0."), lr_mult=3.0)
    summary = sorted((g["wd_mult"], g["lr_mult"], len(g["params"]), g["lr"], g["weight_decay"])
                     for g in groups)
    # Linear weight: decays, scaled; Linear bias: no decay, scaled; LayerNorm: no decay.
    assert summary == [(0.0, 1.0, 2, 0.1, 0.0), (0.0, 3.0, 1, pytest.approx(0.3), 0.0),
                       (1.0, 3.0, 1, pytest.approx(0.3), pytest.approx(0.2))]
