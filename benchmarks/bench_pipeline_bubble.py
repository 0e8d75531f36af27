"""Pipeline bubble of each schedule, from the simulator, beside the published values.

The plans are the ones the runtime executes (``schedule_plan.build_plan``); the
simulator times them under the strict p2p model (a batch ends when its last partner has
posted; the zero-bubble runtime's sends complete while the rank computes) with unit
costs F = B = W = 1 (a whole backward = 2) and free communication. Bubble fraction =
``1 - busy / (pp * makespan)``.

Published: 1F1B (Narayanan et al. 2021) ``(p - 1) / (m + p - 1)``; ZB-H1 (Qi et al.,
"Zero Bubble Pipeline Parallelism", ICLR 2024) bubble time ``(p - 1)(T_F + T_B - T_W)``,
a third of 1F1B's, i.e. ``(p - 1) / (3 m + p - 1)``. Run from the repository root::

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
    plans = [sp.build_plan(r, pp, m, schedule=schedule) for r in range(pp)]
    return sp.simulate(plans, eager_sends=schedule == "zb-h1",
                       costs=UNIT_COSTS)["bubble_fraction"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args(argv)
    print(f"{'pp':>3} {'m':>3} | {'1F1B sim':>9} {'published':>9} | {'ZB-H1 sim':>9} "
          f"{'published':>9} | ZB-H1 / 1F1B")
    for pp in args.pp:
        for m in args.microbatches:
            one, zb = bubble("1f1b", pp, m), bubble("zb-h1", pp, m)
            print(f"{pp:>3} {m:>3} | {one:>9.3f} {sp.published_bubble_fraction('1f1b', pp, m):>9.3f}"
                  f" | {zb:>9.3f} {sp.published_bubble_fraction('zb-h1', pp, m):>9.3f} | "
                  f"{zb / one:.2f}")


if __name__ == "__main__":
    main()
