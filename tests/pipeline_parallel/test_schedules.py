"""Pipelined schedules reproduce the single-process model: losses and every gradient.

A toy model (``toy_model.py``: embedding, Linear+GeLU blocks, output head) is split over
2 or 4 gloo ranks, with and without interleaving, evenly and unevenly, and trained for
one step with the schedule from ``get_forward_backward_func``. Its per-micro-batch losses
and the gradients gathered from all stages must equal the unsplit model's from the same
seed. fp32 tolerance rtol=1e-5/atol=1e-6: each micro-batch runs the same ops in the same
order as the reference, and gradients accumulate over micro-batches in the same order, so
only reassociation noise inside kernels could differ.
"""

import collections
import contextlib
import dataclasses
import functools

import warnings

import pytest
import torch
import torch.distributed as dist

from megacore import parallel_state
from megacore.deprecation import MegacoreDeprecationWarning
from megacore.pipeline_parallel import (
    TrainingHooks, build_plan, get_forward_backward_func, get_layer_offset_and_count)
from megacore.pipeline_parallel.schedule_plan import stage_layout
from megacore.pipeline_parallel.schedules import forward_backward_no_pipelining
from tests.multirank import run_distributed
from tests.pipeline_parallel.toy_model import (
    ToyConfig, ToyModel, ToyStage, forward_step_func, make_batches, reference)

SEQ, MBS = 4, 2
TOL = dict(rtol=1e-5, atol=1e-6)


class _Hooks:
    """Records what the schedule did with its hooks."""

    def __init__(self):
        self.backwards = 0          # backward passes through the first layer of a chunk
        self.no_sync_exit_at = []   # value of `backwards` when no_sync contexts closed
        self.grad_sync_at = []
        self.finalize_calls = []
        self.forwards = 0           # forward passes through any chunk
        self.param_sync_at = []     # (chunk, forwards so far) per param_sync_func call
        self.timed = collections.Counter()

    def training_hooks(self, kind=None, scale=None, chunks=1) -> TrainingHooks:
        """``kind``: None, "no_sync" or "grad_sync" (no_sync plus grad_sync)."""
        return TrainingHooks(
            finalize_model_grads_func=self.finalize,
            no_sync_func=self.no_sync if kind else None,
            grad_sync_func=self.grad_sync if kind == "grad_sync" else None,
            grad_scale_func=(lambda loss: loss * scale) if scale else None,
            param_sync_func=[functools.partial(self.param_sync, c) for c in range(chunks)],
            timers=self.timer)

    def param_sync(self, chunk, params):
        assert all(isinstance(p, torch.nn.Parameter) for p in params)
        self.param_sync_at.append((chunk, self.forwards))

    def timer(self, name, log_level=0):
        hooks = self

        class _Timer:
            def start(self):
                hooks.timed[name] += 1

            def stop(self):
                pass
        return _Timer()

    @contextlib.contextmanager
    def no_sync(self):
        yield
        self.no_sync_exit_at.append(self.backwards)

    def grad_sync(self, params):
        self.grad_sync_at.append(self.backwards)

    def finalize(self, models, *rest):
        self.finalize_calls.append(len(models))


def _stages(full, pp, rank, vpp, layers, first, last, schedule=None):
    vpp_world = vpp if vpp > 1 else None
    layout = stage_layout(schedule, pp, vpp)
    chunks = []
    for c in range(vpp):
        offset, count = get_layer_offset_and_count(layers, pp, rank, vpp_world, c, first, last,
                                                   v_shape=layout.v_shape)
        chunks.append(ToyStage(full, offset, count, pre_process=layout.is_first(rank, c),
                               post_process=layout.is_last(rank, c)))
    return chunks


def _loss_rank(case, pp):
    """The pipeline rank that computes the loss: the last, or 0 for ZBV's V."""
    return 0 if case.get("config", {}).get("pipeline_schedule") == "zbv" else pp - 1


def _run_case(case):
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    vpp, m, layers = case["vpp"], case["m"], case["layers"]
    parallel_state.set_virtual_pipeline_model_parallel_world_size(vpp if vpp > 1 else None)
    parallel_state.set_virtual_pipeline_model_parallel_rank(0 if vpp > 1 else None)
    hooks = _Hooks()
    config = ToyConfig(pipeline_model_parallel_size=pp, **case.get("config", {}))
    chunks = _stages(ToyModel(config, layers), pp, rank, vpp, layers,
                     case.get("first"), case.get("last"), config.pipeline_schedule)
    for chunk in chunks:
        # Count backward passes through any chunk of this rank (a parameter hook fires
        # once per backward and, unlike module hooks, leaves the outputs alone).
        next(chunk.parameters()).register_hook(
            lambda grad: setattr(hooks, "backwards", hooks.backwards + 1))
        chunk.register_forward_pre_hook(
            lambda *unused: setattr(hooks, "forwards", hooks.forwards + 1))
    batches = make_batches(m, SEQ, MBS, vary_seq=case.get("vary_seq", False))
    schedule = get_forward_backward_func()

    training_hooks = hooks.training_hooks(case.get("hooks"), case.get("scale"), len(chunks))
    if case.get("legacy"):  # deprecated: the same hooks as fields of the model's config
        with pytest.warns(MegacoreDeprecationWarning, match="TrainingHooks"):
            for name in dataclasses.fields(training_hooks):
                setattr(config, name.name, getattr(training_hooks, name.name))
        training_hooks = None

    def run(forward_only):
        iters = [iter(batches) for _ in chunks]
        with (pytest.warns(MegacoreDeprecationWarning, match="hooks=TrainingHooks")
              if case.get("legacy") else contextlib.nullcontext()):
            return schedule(forward_step_func=forward_step_func,
                            data_iterator=iters if vpp > 1 else iters[0],
                            model=chunks if vpp > 1 else chunks[0], num_microbatches=m,
                            seq_length=SEQ, micro_batch_size=MBS, forward_only=forward_only,
                            hooks=training_hooks)

    train = run(False)
    timed, hooks.timed = hooks.timed, collections.Counter()
    grads = {}
    for chunk in chunks:
        grads.update(chunk.global_grads())
    evaluation = run(True)
    return {"schedule": schedule.__name__, "train": [d["lm loss"] for d in train],
            "eval": [d["lm loss"] for d in evaluation], "grads": grads,
            "finalize": hooks.finalize_calls, "no_sync_exit_at": hooks.no_sync_exit_at,
            "grad_sync_at": hooks.grad_sync_at, "param_sync_at": hooks.param_sync_at,
            "timed": timed, "timed_eval": hooks.timed,
            "vpp_rank_after": parallel_state.get_virtual_pipeline_model_parallel_rank()}


def _run_cases(cases):
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=dist.get_world_size())
    return [_run_case(case) for case in cases]


def _check(cases, per_rank):
    pp = len(per_rank)
    for i, case in enumerate(cases):
        config = ToyConfig(**case.get("config", {}))
        batches = make_batches(case["m"], SEQ, MBS, vary_seq=case.get("vary_seq", False))
        ref_losses, ref_grads = reference(ToyModel(config, case["layers"]), batches)
        results = [r[i] for r in per_rank]
        expect = "with_interleaving" if case["vpp"] > 1 else "without_interleaving"
        assert all(expect in r["schedule"] for r in results), case
        losses = results[_loss_rank(case, pp)]
        for r in results:
            if r is not losses:
                assert r["train"] == [] and r["eval"] == [], "loss dicts only on the last stage"
        torch.testing.assert_close(losses["train"], ref_losses, **TOL)
        # forward_only sees the same weights (no optimizer step): same losses.
        torch.testing.assert_close(losses["eval"], ref_losses, **TOL)
        grads = {}
        for r in results:
            assert not set(grads) & set(r["grads"]), "a parameter lives on two stages"
            grads.update(r["grads"])
        scale = case.get("scale", 1.0)
        assert sorted(grads) == sorted(ref_grads)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad * scale, **TOL, msg=name)
        for r in results:
            assert r["finalize"] == [case["vpp"]], "finalize_model_grads_func once, all chunks"
            assert r["vpp_rank_after"] == (0 if case["vpp"] > 1 else None)
        _check_hooks(case, results, pp)
        _check_param_sync_and_timers(case, results)


def _check_param_sync_and_timers(case, results):
    m, vpp = case["m"], case["vpp"]
    zero_bubble = case.get("config", {}).get("pipeline_schedule") in ("zb-h1", "zbv")
    for r in results:
        # Chunk 0 and, one chunk ahead, chunk 1 before the first forward; chunk c + 1 at
        # chunk c's first forward (m >= pp per chunk: chunk c starts after c * pp forwards).
        assert [c for c, _ in r["param_sync_at"]] == list(range(vpp)), "once per chunk"
        assert r["param_sync_at"][0] == (0, 0)
        # Training: m * vpp forwards and backwards (B and W timed apart in zb-h1, zbv).
        assert r["timed"]["forward-compute"] == m * vpp
        assert r["timed"]["backward-compute"] == m * vpp * (2 if zero_bubble else 1)
        assert r["timed"]["pipeline-p2p"] > 0
        # Forward-only: no param_sync_func (the pre-hooks gather), forwards timed.
        assert r["timed_eval"]["forward-compute"] == m * vpp
        assert r["timed_eval"]["backward-compute"] == 0


def _check_hooks(case, results, pp):
    if not case.get("hooks"):
        return
    m, vpp = case["m"], case["vpp"]
    for rank, r in enumerate(results):
        if case["hooks"] == "grad_sync":
            # One call per chunk, right after that chunk's last backward (counted in the plan).
            schedule = case.get("config", {}).get("pipeline_schedule")
            backwards = [s for s in build_plan(rank, pp, m, vpp, schedule=schedule)
                         if s.op in ("backward", "backward_weight")]
            last = {s.chunk: i + 1 for i, s in enumerate(backwards)}
            assert r["grad_sync_at"] == sorted(last.values())
            assert r["no_sync_exit_at"] == [m * vpp], "no_sync stays on for the whole step"
        else:
            # The context closes just before the final backward, so DDP reduces during it.
            assert r["no_sync_exit_at"] == [m * vpp - 1]
            assert r["grad_sync_at"] == []


PP2_CASES = [
    {"vpp": 1, "m": 3, "layers": 4, "hooks": "no_sync"},
    {"vpp": 2, "m": 4, "layers": 8, "hooks": "grad_sync"},
    # Deprecated: hooks on the config (no hooks= argument) still run, with a warning.
    {"vpp": 2, "m": 2, "layers": 4, "hooks": "no_sync", "legacy": True},
    # Uneven 1 + 3 layers, non-batched p2p, freed outputs, loss scaling.
    {"vpp": 1, "m": 2, "layers": 4, "first": 1, "last": 3, "scale": 4.0,
     "config": {"batch_p2p_comm": False, "deallocate_pipeline_outputs": True}},
    # Uneven interleaved (rank 0: 1 layer per chunk, rank 1: 2), sequence length varies.
    {"vpp": 2, "m": 2, "layers": 6, "first": 2, "last": 4, "vary_seq": True,
     "config": {"variable_seq_lengths": True}},
    # Zero bubble (B/W split, eager sends): hooks follow the W steps.
    {"vpp": 1, "m": 5, "layers": 4, "hooks": "grad_sync", "config": {"pipeline_schedule": "zb-h1"}},
    # ZBV (two chunks in a V, local hand-off on rank 1, loss on rank 0), m < 2 pp and >.
    {"vpp": 2, "m": 3, "layers": 4, "hooks": "grad_sync", "config": {"pipeline_schedule": "zbv"}},
    {"vpp": 2, "m": 6, "layers": 8, "hooks": "no_sync", "scale": 2.0,
     "config": {"pipeline_schedule": "zbv", "deallocate_pipeline_outputs": True,
                "batch_p2p_comm": False}},
]

PP4_CASES = [
    {"vpp": 1, "m": 5, "layers": 4, "hooks": "no_sync"},
    {"vpp": 2, "m": 4, "layers": 8, "config": {"deallocate_pipeline_outputs": True}},
    {"vpp": 1, "m": 3, "layers": 10, "first": 1, "last": 3,
     "config": {"batch_p2p_comm": False}},
    {"vpp": 2, "m": 8, "layers": 16, "first": 2, "last": 6},
    {"vpp": 1, "m": 6, "layers": 4, "hooks": "no_sync", "config": {"pipeline_schedule": "zb-h1"}},
    {"vpp": 1, "m": 3, "layers": 6, "first": 1, "last": 1, "scale": 2.0,
     "config": {"pipeline_schedule": "zb-h1", "deallocate_pipeline_outputs": True,
                "batch_p2p_comm": False}},
    {"vpp": 2, "m": 8, "layers": 8, "hooks": "grad_sync", "config": {"pipeline_schedule": "zbv"}},
    {"vpp": 2, "m": 5, "layers": 16, "config": {"pipeline_schedule": "zbv",
                                                "deallocate_pipeline_outputs": True}},
]


def test_pipeline_matches_single_process_pp2():
    _check(PP2_CASES, run_distributed(_run_cases, 2, args=(PP2_CASES,)))


def test_pipeline_matches_single_process_pp4():
    _check(PP4_CASES, run_distributed(_run_cases, 4, args=(PP4_CASES,)))


def _bad_calls():
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2,
                                             virtual_pipeline_model_parallel_size=2)
    config = ToyConfig(pipeline_model_parallel_size=2)
    full = ToyModel(config, 4)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = _stages(full, 2, rank, 2, 4, None, None)
    errors = []
    with pytest.warns(MegacoreDeprecationWarning):
        chunks[0].config.grad_scale_func = lambda loss: loss
    for m, iters, hooks in ((3, [iter([])] * 2, None), (4, [iter([])], None),
                            (4, [iter([])] * 2, TrainingHooks())):
        try:
            get_forward_backward_func()(
                forward_step_func=forward_step_func, data_iterator=iters, model=chunks,
                num_microbatches=m, seq_length=SEQ, micro_batch_size=MBS, hooks=hooks)
        except ValueError as error:
            errors.append(str(error))
    return errors


def test_invalid_calls_fail_on_every_rank_before_communicating():
    for errors in run_distributed(_bad_calls, 2, timeout=60):
        assert len(errors) == 3
        assert "--num-virtual-stages-per-pipeline-rank" in errors[0]
        assert "multiple of --pipeline-model-parallel-size" in errors[0]
        assert "one per chunk" in errors[1]
        assert "set on the model config (grad_scale_func)" in errors[2]


# ---- no pipelining: no processes needed ------------------------------------------------
def _single_stage(layers=3, **config):
    cfg = ToyConfig(**config)
    full = ToyModel(cfg, layers)
    return full, ToyStage(ToyModel(cfg, layers), 0, layers, True, True)


@pytest.mark.parametrize("m", [1, 3])
def test_no_pipelining_accumulates_like_one_batch(m):
    hooks = _Hooks()
    full, stage = _single_stage()
    batches = make_batches(m, SEQ, MBS)
    out = forward_backward_no_pipelining(
        forward_step_func=forward_step_func, data_iterator=iter(batches), model=[stage],
        num_microbatches=m, seq_length=SEQ, micro_batch_size=MBS,
        hooks=hooks.training_hooks("no_sync"))
    ref_losses, ref_grads = reference(full, batches)
    torch.testing.assert_close([d["lm loss"] for d in out], ref_losses, **TOL)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(stage.global_grads()[name], grad, **TOL)
    assert len(hooks.no_sync_exit_at) == m - 1 and hooks.finalize_calls == [1]
    stage.zero_grad()
    evaluation = forward_backward_no_pipelining(
        forward_step_func=forward_step_func, data_iterator=iter(batches), model=stage,
        num_microbatches=m, seq_length=SEQ, micro_batch_size=MBS, forward_only=True,
        hooks=hooks.training_hooks("no_sync"))
    torch.testing.assert_close([d["lm loss"] for d in evaluation], ref_losses, **TOL)
    assert all(p.grad is None or not p.grad.any() for p in stage.parameters())
    assert hooks.finalize_calls == [1], "no finalize in forward_only"


def test_per_token_loss_form_is_not_divided_and_tokens_reach_finalize():
    seen = {}
    full, stage = _single_stage()
    hooks = TrainingHooks(finalize_model_grads_func=lambda models, n: seen.update(n=n))
    batches = make_batches(2, SEQ, MBS)

    def step(data_iterator, model):
        output, loss_func = forward_step_func(data_iterator, model)

        def sum_loss(logits):
            loss, _ = loss_func(logits)
            tokens = torch.tensor(SEQ * MBS)
            return loss * tokens, tokens, {"lm loss": loss.detach()}
        return output, sum_loss

    forward_backward_no_pipelining(forward_step_func=step, data_iterator=iter(batches),
                                   model=stage, num_microbatches=2, seq_length=SEQ,
                                   micro_batch_size=MBS, hooks=hooks)
    _, ref_grads = reference(full, batches)
    # Reference uses mean over micro-batches of mean over tokens; the summed form gives
    # (num micro-batches x tokens) times that before finalize normalizes.
    factor = 2 * SEQ * MBS
    for name, grad in ref_grads.items():
        torch.testing.assert_close(stage.global_grads()[name], grad * factor, **TOL)
    assert int(seen["n"]) == 2 * SEQ * MBS


def test_collect_non_loss_data_only_in_forward_only():
    _, stage = _single_stage()
    with pytest.raises(ValueError, match="forward_only"):
        forward_backward_no_pipelining(
            forward_step_func=forward_step_func, data_iterator=iter([]), model=stage,
            num_microbatches=1, collect_non_loss_data=True)


def test_zbv_refuses_p2p_without_tags(monkeypatch):
    # NCCL pairs a link's messages in posting order; ZBV's orders need gloo's tags.
    from megacore.pipeline_parallel import schedules
    monkeypatch.setattr(schedules.dist, "get_backend", lambda group: "nccl")
    with pytest.raises(ValueError, match="--pipeline-schedule zbv needs gloo p2p"):
        schedules._check_tag_matched_p2p(type("Comm", (), {"group": None})())


# ---- hooks: TrainingHooks and the deprecated config fields -----------------------------
def test_training_hooks_check_their_values_and_are_frozen():
    hooks = TrainingHooks(no_sync_func=[contextlib.nullcontext, contextlib.nullcontext])
    assert hooks.no_sync_func == (contextlib.nullcontext, contextlib.nullcontext)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hooks.grad_scale_func = None
    with pytest.raises(TypeError, match="TrainingHooks.grad_sync_func must be callable"):
        TrainingHooks(grad_sync_func=[print, 3])
    with pytest.raises(TypeError, match="TrainingHooks.grad_scale_func must be callable"):
        TrainingHooks(grad_scale_func=2.0)


def test_deprecated_config_hooks_warn_and_still_run_without_hooks_argument():
    hooks = _Hooks()
    with pytest.warns(MegacoreDeprecationWarning, match="ModelParallelConfig.no_sync_func.*"
                                                        "TrainingHooks"):
        full, stage = _single_stage(no_sync_func=hooks.no_sync)
    with pytest.warns(MegacoreDeprecationWarning, match="finalize_model_grads_func"):
        stage.config.finalize_model_grads_func = hooks.finalize
    batches = make_batches(3, SEQ, MBS)
    with pytest.warns(MegacoreDeprecationWarning, match="hooks=TrainingHooks"):
        out = forward_backward_no_pipelining(
            forward_step_func=forward_step_func, data_iterator=iter(batches), model=stage,
            num_microbatches=3, seq_length=SEQ, micro_batch_size=MBS)
    ref_losses, ref_grads = reference(full, batches)
    torch.testing.assert_close([d["lm loss"] for d in out], ref_losses, **TOL)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(stage.global_grads()[name], grad, **TOL)
    assert len(hooks.no_sync_exit_at) == 2 and hooks.finalize_calls == [1]
    # Both places at once: refused before any forward.
    with pytest.raises(ValueError, match="finalize_model_grads_func, no_sync_func"):
        forward_backward_no_pipelining(
            forward_step_func=forward_step_func, data_iterator=iter(batches), model=stage,
            num_microbatches=3, hooks=TrainingHooks())


def test_none_on_a_deprecated_field_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = ToyConfig(timers=None)
        config.no_sync_func = None


def test_no_pipelining_param_sync_once_before_forward_and_timers():
    hooks = _Hooks()
    _, stage = _single_stage()
    stage.register_forward_pre_hook(lambda *unused: setattr(hooks, "forwards",
                                                            hooks.forwards + 1))
    for forward_only in (False, True):
        forward_backward_no_pipelining(
            forward_step_func=forward_step_func, data_iterator=iter(make_batches(2, SEQ, MBS)),
            model=stage, num_microbatches=2, forward_only=forward_only,
            hooks=hooks.training_hooks())
    assert hooks.param_sync_at == [(0, 0)], "training step only, before the first forward"
    assert hooks.timed == {"forward-compute": 4, "backward-compute": 2}
