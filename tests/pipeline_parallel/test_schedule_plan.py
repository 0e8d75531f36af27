"""Per-rank schedule orders, run together by the simulator (pure: no processes).

Every valid combination of pp <= 8, vpp <= 4 and 1..16 micro-batches, training and
forward-only, must finish without deadlock under the strictest p2p model (a send completes
only when its receive is posted; each batch waits for all its messages), pair every
message with the tensor the receiver expects, and run each forward before its backward.
The simulator itself is shown to catch deadlocks, swapped messages and early backwards.
"""

import collections

import pytest

from megacore.pipeline_parallel import schedule_plan as sp
from megacore.pipeline_parallel.schedule_plan import ScheduleError, Step, build_plan, simulate


def _valid_combinations():
    for pp in range(1, 9):
        for vpp in range(1, 5):
            for m in range(1, 17):
                try:
                    sp.validate_schedule_args(pp, m, vpp)
                except ValueError:
                    continue
                yield pp, vpp, m


def _compute_steps(plan):
    return [s for s in plan if s.op in sp.COMPUTE_OPS]


def test_every_valid_combination_completes():
    checked = collections.Counter()
    for pp, vpp, m in _valid_combinations():
        for forward_only in (False, True):
            plans = [build_plan(r, pp, m, vpp, forward_only=forward_only) for r in range(pp)]
            simulate(plans, vpp)
            for plan in plans:
                steps = _compute_steps(plan)
                expected = {(mb, c) for mb in range(m) for c in range(vpp)}
                forwards = [(s.microbatch, s.chunk) for s in steps if s.op == sp.FORWARD]
                backwards = [(s.microbatch, s.chunk) for s in steps if s.op == sp.BACKWARD]
                assert sorted(forwards) == sorted(expected)
                assert sorted(backwards) == ([] if forward_only else sorted(expected))
            checked[vpp > 1] += 1
    # 8 * 16 non-interleaved and every pp in 2..8 dividing m for vpp 2..4, both modes.
    assert checked[False] == 2 * 8 * 16
    assert checked[True] == 2 * 3 * sum(16 // pp for pp in range(2, 9))


def test_one_f_one_b_order_matches_the_documented_example():
    # Module docstring: pp=2, m=3.
    def short(plan):
        names = {"forward": "F", "backward": "B", "send_forward": "sF", "recv_forward": "rF",
                 "send_backward": "sB", "recv_backward": "rB"}
        return " ".join(f"{names[s.op]}{s.microbatch}" for s in plan)

    assert short(build_plan(0, 2, 3)) == "F0 sF0 F1 sF1 rB0 B0 F2 sF2 rB1 B1 rB2 B2"
    assert short(build_plan(1, 2, 3)) == "rF0 F0 B0 rF1 sB0 F1 B1 rF2 sB1 F2 B2 sB2"


def test_warmup_counts_bound_activation_memory():
    # 1F1B keeps at most pp - rank micro-batches in flight (forwards without backward yet).
    for pp in range(1, 9):
        for rank in range(pp):
            in_flight = peak = 0
            for step in _compute_steps(build_plan(rank, pp, 16)):
                in_flight += 1 if step.op == sp.FORWARD else -1
                peak = max(peak, in_flight)
            assert peak == pp - rank


def test_interleaved_chunk_order():
    table = sp.microbatch_chunk_table(4, 2, 2)
    assert table == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]


@pytest.mark.parametrize("args, flags", [
    ((2, 3, 2, None), ["--num-virtual-stages-per-pipeline-rank=2",
                       "multiple of --pipeline-model-parallel-size (2)"]),
    ((4, 8, 2, 8), ["--microbatch-group-size-per-virtual-stage (8)"]),
    ((1, 4, 2, None), ["needs --pipeline-model-parallel-size >= 2"]),
    ((2, 0, None, None), ["num_microbatches must be >= 1"]),
])
def test_invalid_combinations_name_the_flags(args, flags):
    with pytest.raises(ValueError) as info:
        sp.validate_schedule_args(*args)
    for flag in flags:
        assert flag in str(info.value)


# ---- the simulator can fail -------------------------------------------------------------
def test_simulator_detects_deadlock():
    # Rank 0 waits for a gradient before sending the activation it depends on.
    plans = [[Step("warmup", sp.FORWARD, 0, 0), Step("warmup", sp.RECV_BACKWARD, 0, 0),
              Step("warmup", sp.BACKWARD, 0, 0), Step("warmup", sp.SEND_FORWARD, 0, 0)],
             [Step("warmup", sp.RECV_FORWARD, 0, 0), Step("warmup", sp.FORWARD, 0, 0),
              Step("warmup", sp.BACKWARD, 0, 0), Step("warmup", sp.SEND_BACKWARD, 0, 0)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(plans)


def test_simulator_detects_unsupported_group_size_deadlock(monkeypatch):
    # A micro-batch group larger than pp is rejected by validation because it deadlocks.
    monkeypatch.setattr(sp, "validate_schedule_args", lambda pp, m, vpp=None, g=None: g or pp)
    plans = [build_plan(r, 2, 4, 2, group_size=4) for r in range(2)]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(plans, 2)


def test_simulator_detects_swapped_messages():
    plans = [build_plan(r, 2, 2) for r in range(2)]
    # Rank 1 receives micro-batch 1's activation where micro-batch 0's is sent.
    plans[1] = [s._replace(microbatch=1 - s.microbatch) if s.op == sp.RECV_FORWARD else s
                for s in plans[1]]
    with pytest.raises(ScheduleError, match="receiver expects"):
        simulate(plans)


def test_simulator_detects_backward_before_forward():
    plan = build_plan(0, 1, 2)
    with pytest.raises(ScheduleError, match="before its forward"):
        simulate([[plan[1], plan[0]] + plan[2:]])


def test_batches_group_consecutive_communication():
    batches = sp.group_batches(build_plan(1, 3, 2))
    kinds = [tuple(s.op for s in b) if not isinstance(b, Step) else b.op for b in batches]
    assert kinds[:4] == [("recv_forward",), "forward", ("send_forward", "recv_forward"),
                         "forward"]


# ---- zero bubble (ZB-H1) ----------------------------------------------------------------
UNIT_COSTS = {"forward": 1, "backward": 2, "backward_input": 1, "backward_weight": 1}


def _assert_each_once(plans, expected, forward_only):
    """Every rank runs F (and, training, B and W) once for each expected (mb, chunk)."""
    for rank, plan in enumerate(plans):
        steps = _compute_steps(plan)
        for op in (sp.FORWARD, sp.BACKWARD_INPUT, sp.BACKWARD_WEIGHT):
            got = sorted((s.microbatch, s.chunk) for s in steps if s.op == op)
            assert got == (expected if op == sp.FORWARD or not forward_only else []), \
                (len(plans), rank, op)


def test_zero_bubble_every_combination_completes_in_order():
    # pp <= 8, m <= 16, training and forward-only, with the runtime's eager sends and with
    # the strict model: no deadlock, right tensors, F before B before W, each exactly once.
    for pp in range(1, 9):
        for m in range(1, 17):
            for forward_only in (False, True):
                plans = [build_plan(r, pp, m, schedule="zb-h1", forward_only=forward_only)
                         for r in range(pp)]
                simulate(plans, eager_sends=True)
                simulate(plans)
                _assert_each_once(plans, sorted((mb, 0) for mb in range(m)), forward_only)


def test_zero_bubble_keeps_one_f_one_b_memory():
    # Per rank: at most pp - r forwards ahead of their B, and at most pp (1F1B's peak on
    # rank 0) micro-batches between F and W, whose activations are still alive.
    for pp in range(1, 9):
        for rank in range(pp):
            ahead = alive = peak_ahead = peak_alive = 0
            for step in _compute_steps(build_plan(rank, pp, 16, schedule="zb-h1")):
                ahead += {sp.FORWARD: 1, sp.BACKWARD_INPUT: -1}.get(step.op, 0)
                alive += {sp.FORWARD: 1, sp.BACKWARD_WEIGHT: -1}.get(step.op, 0)
                peak_ahead, peak_alive = max(peak_ahead, ahead), max(peak_alive, alive)
            assert peak_ahead <= pp - rank and peak_alive <= pp, (pp, rank)


def test_bubble_fractions_against_published_values():
    for pp in range(2, 9):
        for m in range(1, 17):
            one = simulate([build_plan(r, pp, m) for r in range(pp)], costs=UNIT_COSTS)
            zb = simulate([build_plan(r, pp, m, schedule="zb-h1") for r in range(pp)],
                          eager_sends=True, costs=UNIT_COSTS)
            # 1F1B's timing reproduces (p - 1) / (m + p - 1) exactly.
            assert one["bubble_fraction"] == pytest.approx(
                sp.published_bubble_fraction("1f1b", pp, m), abs=1e-12)
            # ZB-H1: the paper's (p - 1) / (3m + p - 1) exactly when m >= p (its formula
            # assumes a full steady state); with fewer micro-batches, between it and 1F1B.
            published = sp.published_bubble_fraction("zb-h1", pp, m)
            if m >= pp:
                assert zb["bubble_fraction"] == pytest.approx(published, abs=1e-12)
            else:
                assert published <= zb["bubble_fraction"] <= one["bubble_fraction"]


def test_zero_bubble_order_matches_the_documented_example():
    names = {"forward": "F", "backward_input": "B", "backward_weight": "W",
             "send_forward": "sF", "recv_forward": "rF", "send_backward": "sB",
             "recv_backward": "rB"}

    def short(plan):
        return " ".join(f"{names[s.op]}{s.microbatch}" for s in plan)

    assert short(build_plan(0, 2, 3, schedule="zb-h1")) == \
        "F0 sF0 F1 sF1 rB0 B0 W0 F2 sF2 rB1 B1 W1 rB2 B2 W2"
    assert short(build_plan(1, 2, 3, schedule="zb-h1")) == \
        "rF0 F0 B0 rF1 sB0 F1 B1 sB1 W0 rF2 F2 B2 sB2 W1 W2"


def test_simulator_detects_weight_before_input_half():
    plan = build_plan(0, 1, 1, schedule="zb-h1")
    assert [s.op for s in plan] == ["forward", "backward_input", "backward_weight"]
    with pytest.raises(ScheduleError, match="backward_weight of micro-batch 0 chunk 0 before"):
        simulate([[plan[0], plan[2], plan[1]]])


def test_eager_sends_are_waited_for_at_the_end():
    # Rank 1 receives only the first of rank 0's two sends: the plan cannot finish.
    plans = [[Step("w", sp.FORWARD, 0, 0), Step("w", sp.SEND_FORWARD, 0, 0),
              Step("w", sp.FORWARD, 1, 0), Step("w", sp.SEND_FORWARD, 1, 0)],
             [Step("w", sp.RECV_FORWARD, 0, 0), Step("w", sp.FORWARD, 0, 0)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(plans, eager_sends=True)


@pytest.mark.parametrize("schedule, pp, chunks, flags", [
    ("zbx", 2, 1, ["--pipeline-schedule must be one of 1f1b, interleaved-1f1b, zb-h1, zbv"]),
    ("zbv", 2, 1, ["--pipeline-schedule zbv runs exactly 2 model chunks",
                   "--num-virtual-stages-per-pipeline-rank 2"]),
    ("zbv", 4, 3, ["--num-virtual-stages-per-pipeline-rank 2 (got 3)"]),
    ("zb-h1", 2, 2, ["--pipeline-schedule zb-h1 runs one model chunk",
                     "--num-virtual-stages-per-pipeline-rank=2"]),
    ("1f1b", 2, 2, ["--pipeline-schedule interleaved-1f1b"]),
    ("interleaved-1f1b", 2, 1, ["--num-virtual-stages-per-pipeline-rank >= 2"]),
])
def test_invalid_schedule_choices_name_the_flags(schedule, pp, chunks, flags):
    with pytest.raises(ValueError) as info:
        sp.validate_pipeline_schedule(schedule, pp, chunks)
    for flag in flags:
        assert flag in str(info.value)


# --------------------------------------------------------------------------------------
# ZBV
# --------------------------------------------------------------------------------------
def _zbv_plans(pp, m, forward_only=False):
    return [build_plan(r, pp, m, 2, schedule="zbv", forward_only=forward_only)
            for r in range(pp)]


def _simulate_zbv(plans, **kwargs):
    return simulate(plans, 2, v_shape=True, match_by_kind=True, **kwargs)


def test_zbv_layout_is_a_v():
    layout = sp.stage_layout("zbv", 4, 2)
    assert [layout.stage(r, c) for c in (0, 1) for r in range(4)] == [0, 1, 2, 3, 7, 6, 5, 4]
    assert all(layout.place(layout.stage(r, c)) == (r, c) for r in range(4) for c in (0, 1))
    assert layout.is_first(0, 0) and layout.is_last(0, 1) and not layout.is_last(3, 1)
    # Chunk 1 sends activations to the previous rank, gradients to the next.
    assert layout.neighbour(2, 1, 1) == (1, 1) and layout.neighbour(2, 1, -1) == (3, 1)
    assert layout.neighbour(3, 0, 1) == (3, 1)   # the turn of the V: same rank


def test_zbv_every_combination_completes_in_order():
    # pp <= 8, m <= 16 (every m: ZBV needs no minimum), training with the runtime's
    # deferred sends, forward-only under the strict model: no deadlock, right tensors,
    # hand-offs before use, F before B before W, each exactly once per chunk.
    for pp in range(1, 9):
        for m in range(1, 17):
            for forward_only in (False, True):
                plans = _zbv_plans(pp, m, forward_only)
                _simulate_zbv(plans, deferred_sends=not forward_only)
                _assert_each_once(plans, sorted((mb, c) for mb in range(m) for c in (0, 1)),
                                  forward_only)
                handoffs = [s for s in plans[-1] if s.op in sp.HANDOFF_OPS]
                assert len(handoffs) == m * (1 if forward_only else 2)
                assert all(s.op not in sp.HANDOFF_OPS for plan in plans[:-1] for s in plan)


def test_zbv_needs_deferred_sends_and_tag_matching():
    # Why the runtime waits for sends only at the end and needs gloo's tags: with eager
    # sends (waited for at the next exchange) pp=3 deadlocks, and on link r -> r+1 chunk
    # 0's activations and chunk 1's gradients are received in another order than sent.
    with pytest.raises(ScheduleError, match="deadlock"):
        _simulate_zbv(_zbv_plans(3, 6), eager_sends=True)
    with pytest.raises(ScheduleError, match="sender sends"):
        simulate(_zbv_plans(2, 4), 2, v_shape=True, deferred_sends=True)


def test_zbv_keeps_one_f_one_b_memory():
    # At most 2 pp chunk-activations (pp micro-batches of a whole stage, 1F1B's peak on
    # rank 0) between a chunk's F and its W on any rank.
    for pp in range(1, 9):
        for rank in range(pp):
            alive = peak = 0
            for step in _compute_steps(build_plan(rank, pp, 16, 2, schedule="zbv")):
                alive += {sp.FORWARD: 1, sp.BACKWARD_WEIGHT: -1}.get(step.op, 0)
                peak = max(peak, alive)
            assert peak <= 2 * pp, (pp, rank, peak)


def test_zbv_bubble_against_zb_h1_and_published():
    for pp in range(2, 9):
        for m in range(2 * pp, 17):
            zbv = _simulate_zbv(_zbv_plans(pp, m), deferred_sends=True, costs=UNIT_COSTS)
            zb = simulate([build_plan(r, pp, m, schedule="zb-h1") for r in range(pp)],
                          eager_sends=True, costs=UNIT_COSTS)
            # Published: 0 as m grows; the plans keep only (p - 1) chunk-forwards of
            # start-up per rank, about half of ZB-H1's bubble.
            assert sp.published_bubble_fraction("zbv", pp, m) == 0.0
            assert zbv["bubble_fraction"] == pytest.approx((pp - 1) / (6 * m + pp - 1),
                                                           abs=1e-12)
            assert zbv["bubble_fraction"] < zb["bubble_fraction"]


def test_zbv_order_matches_the_documented_example():
    names = {"forward": "F", "backward_input": "B", "backward_weight": "W"}
    steps = _compute_steps(build_plan(1, 2, 4, 2, schedule="zbv"))
    assert " ".join(f"{names[s.op]}{s.chunk}.{s.microbatch}" for s in steps) == (
        "F0.0 F1.0 F0.1 F1.1 B1.0 W1.0 F0.2 B0.0 W0.0 F1.2 B1.1 W1.1 "
        "F0.3 B0.1 W0.1 F1.3 B1.2 W1.2 B0.2 B1.3 B0.3 W0.2 W1.3 W0.3")


def test_simulator_detects_missing_handoff():
    plan = build_plan(0, 1, 1, 2, schedule="zbv")
    assert [s.op for s in plan][:3] == ["forward", "handoff_forward", "forward"]
    with pytest.raises(ScheduleError, match="before chunk 0 handed its input over"):
        _simulate_zbv([[s for s in plan if s.op != sp.HANDOFF_FORWARD]])
