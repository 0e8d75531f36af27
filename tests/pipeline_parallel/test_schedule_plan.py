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
