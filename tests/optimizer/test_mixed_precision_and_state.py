"""fp16 loss scaling with an injected Inf, and optimizer state saved at one data-parallel
size and loaded at another.

* An Inf placed (after the dp reduction) in one rank's gradient only makes *every* rank
  skip exactly that step, leaves the params bit-identical and halves the loss scale
  (hysteresis 1); the next steps update normally with the scale kept.
* A distributed-optimizer state (with the param scheduler) saved at dp=4 after 2 steps and
  loaded at dp=2 (distributed optimizer, and plain optimizer) into a model built from
  *different* weights continues exactly like an uninterrupted single-process run. fp32,
  rtol/atol 1e-5 as in test_parallel_training.py (reduction order only).
"""

import torch
import torch.distributed as dist

from megacore import parallel_state
from megacore.optimizer import OptimizerParamScheduler
from tests.distributed.toy_training import (
    LR,
    SCHEDULER_ARGS,
    Case,
    build,
    full_params,
    make_batches,
    make_master,
    reference_run,
    train_step,
)
from tests.multirank import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)


def _inject_inf_on_rank_1(model):
    if dist.get_rank() == 1:
        for buf in model.buffers:
            buf.grad_data.fill_(float("inf"))


def _fp16_skip(master, batches, use_distributed_optimizer):
    parallel_state.initialize_model_parallel()
    model, optimizer = build(master, Case(use_distributed_optimizer=use_distributed_optimizer),
                             opt_kwargs=dict(initial_loss_scale=2.0 ** 12, hysteresis=1,
                                             loss_scale_window=1000), dtype=torch.float16)
    trace = []
    for step, (x, y) in enumerate(batches):
        before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
        result = train_step(model, optimizer, x, y,
                            before_step=_inject_inf_on_rank_1 if step == 1 else None)
        unchanged = all(torch.equal(before[n], p) for n, p in model.module.named_parameters())
        trace.append((result, float(optimizer.get_loss_scale()), unchanged))
    return trace, full_params(model)


def test_fp16_inf_skips_exactly_that_step_and_halves_the_scale():
    master, batches = make_master(), make_batches(4)
    finals = []
    for use_distributed_optimizer in (False, True):
        results = run_distributed(_fp16_skip, 2, args=(master, batches, use_distributed_optimizer))
        for trace, _ in results:
            updated = [r[0][0] for r in trace]
            assert updated == [True, False, True, True]
            assert trace[1][0] == (False, None, None)
            assert [r[1] for r in trace] == [2.0 ** 12, 2.0 ** 11, 2.0 ** 11, 2.0 ** 11]
            assert [r[2] for r in trace] == [False, True, False, False]
        finals.append(results[0][1])
    # Plain and distributed optimizer do the same fp32 main-param math; fp16 params agree
    # to within one fp16 rounding step.
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-3, atol=1e-3)


def _bf16_train(master, batches, use_distributed_optimizer):
    parallel_state.initialize_model_parallel()
    model, optimizer = build(master, Case(use_distributed_optimizer=use_distributed_optimizer),
                             dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for x, y in batches:
        assert train_step(model, optimizer, x, y)[0]
    assert all(p.dtype == torch.float32 for p in optimizer.get_parameters())
    return full_params(model), optimizer.state_dict()["params"]


def test_bf16_params_with_fp32_main_params():
    """bf16 model, fp32 grads and main params: plain and distributed optimizer keep the
    same fp32 main params (rtol 1e-5: reduction order only), the bf16 params are those
    rounded, and training stays near the fp32 reference: bf16 activations perturb the
    grads by ~1%, which Adam can turn into a full lr-sized step on a tiny-grad element, so
    that check is on the mean absolute difference (5e-3, a quarter of one lr step)."""
    master, batches = make_master(), make_batches(3)
    ref_params, _ = reference_run(master, batches)
    runs = [run_distributed(_bf16_train, 2, args=(master, batches, d))[0] for d in (False, True)]
    for name, ref in ref_params.items():
        main_plain = runs[0][1]["0/" + name]["main_param"]
        main_dist = runs[1][1]["0/" + name]["main_param"]
        torch.testing.assert_close(main_plain, main_dist, **TOL)
        assert (main_plain - ref).abs().mean() < 5e-3, name
        torch.testing.assert_close(runs[1][0][name], main_dist.bfloat16().float(), rtol=0, atol=0)


def _save(master, batches, steps):
    parallel_state.initialize_model_parallel()
    model, optimizer = build(master, Case(use_distributed_optimizer=True),
                             opt_kwargs=dict(min_lr=LR / 10))
    scheduler = OptimizerParamScheduler(optimizer, **SCHEDULER_ARGS)
    for x, y in batches[:steps]:
        train_step(model, optimizer, x, y, scheduler)
    return optimizer.state_dict(), model.state_dict(), scheduler.state_dict()


def _load_and_continue(other_master, batches, steps, saved, use_distributed_optimizer):
    parallel_state.initialize_model_parallel()
    optimizer_sd, model_sd, scheduler_sd = saved
    case = Case(use_distributed_optimizer=use_distributed_optimizer)
    model, optimizer = build(other_master, case, opt_kwargs=dict(min_lr=LR / 10))
    scheduler = OptimizerParamScheduler(optimizer, **SCHEDULER_ARGS)
    model.load_state_dict(model_sd)
    optimizer.load_state_dict(optimizer_sd)
    scheduler.load_state_dict(scheduler_sd)
    for x, y in batches[steps:]:
        train_step(model, optimizer, x, y, scheduler)
    return full_params(model)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        elif torch.is_tensor(a[key]):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        else:
            assert a[key] == b[key], key


def test_distributed_optimizer_state_reshards_from_dp4_to_dp2():
    master, batches, steps = make_master(), make_batches(4), 2
    ref_params, _ = reference_run(master, batches, scheduler_args=SCHEDULER_ARGS)
    saved = run_distributed(_save, 4, args=(master, batches, steps))
    for other in saved[1:]:
        _assert_same_state(saved[0][0], other[0])  # dp-independent: same on every rank
    fields = saved[0][0]["params"]["0/fc1.weight"].keys()
    assert {"exp_avg", "exp_avg_sq", "step", "main_param"} <= fields
    other_master = make_master(seed=7)
    for use_distributed_optimizer in (True, False):
        results = run_distributed(_load_and_continue, 2,
                                  args=(other_master, batches, steps, saved[0],
                                        use_distributed_optimizer))
        for params in results:
            for name, ref in ref_params.items():
                torch.testing.assert_close(params[name], ref, **TOL,
                                           msg=f"dist={use_distributed_optimizer} {name}")
