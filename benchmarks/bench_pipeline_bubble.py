"""Pipeline bubble of each schedule, from the simulator, beside the published values.

The plans are the ones the runtime executes (``schedule_plan.build_plan``); the
simulator times them under the strict p2p model (a batch ends when its last partner has
posted; the zero-bubble runtime's sends complete while the rank computes) with unit
costs F = B = W = 1 (a whole backward = 2) and free communication. Bubble fraction =
``1 - busy / (pp * makespan)``.

Published: 1F1B (Narayanan et al. 2021) ``(p - 1) / (m + p - 1)``; ZB-H1 (Qi et al.,
"Zero Bubble Pipeline Parallelism", ICLR 2024) bubble time ``(p - 1)(T_F + T_B - T_W)``,
a third of 1F1B's, i.e. ``(p - 1) / (3 m + p - 1)``; ZBV (Qi et al., "Pipeline
Parallelism with Controllable Memory", 2024, V-ZB) bubble rate 0 for equal F, B and W
(as m grows). ZBV's costs are per chunk (half a stage each); the fraction does not
depend on that scale. Its plans run with the ZBV runtime's p2p model: sends waited for
at the end, messages matched by kind (gloo tags). Run from the repository root::

    python benchmarks/bench_pipeline_bubble.py --pp 2 4 8 --microbatches 4 8 16
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacore.pipeline_parallel import schedule_plan as sp  # noqa: E402

UNIT_COSTS = {sp.FORWARD: 1.0, sp.BACKWARD: 2.0, sp.BACKWARD_INPUT: 1.0,
              sp.BACKWARD_WEIGHT: 1.0}


def bubble(schedule: str, pp: int, m: int) -> float:
    if schedule == "zbv":
        plans = [sp.build_plan(r, pp, m, 2, schedule="zbv") for r in range(pp)]
        return sp.simulate(plans, 2, v_shape=True, match_by_kind=True, deferred_sends=True,
                           costs=UNIT_COSTS)["bubble_fraction"]
    plans = [sp.build_plan(r, pp, m, schedule=schedule) for r in range(pp)]
    return sp.simulate(plans, eager_sends=schedule == "zb-h1",
                       costs=UNIT_COSTS)["bubble_fraction"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args(argv)
    print(f"{'pp':>3} {'m':>3} | {'1F1B sim':>9} {'published':>9} | {'ZB-H1 sim':>9} "
          f"{'published':>9} | {'ZBV sim':>9} {'published':>9} | ZB-H1 / 1F1B | ZBV / 1F1B")
    for pp in args.pp:
        for m in args.microbatches:
            one, zb, zbv = (bubble(s, pp, m) for s in ("1f1b", "zb-h1", "zbv"))
            published = {s: sp.published_bubble_fraction(s, pp, m)
                         for s in ("1f1b", "zb-h1", "zbv")}
            print(f"{pp:>3} {m:>3} | {one:>9.3f} {published['1f1b']:>9.3f}"
                  f" | {zb:>9.3f} {published['zb-h1']:>9.3f}"
                  f" | {zbv:>9.3f} {published['zbv']:>9.3f} | {zb / one:>12.2f} | "
                  f"{zbv / one:.2f}")


if __name__ == "__main__":
    main()
