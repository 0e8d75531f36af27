"""Run a test function on N ``torch.distributed`` ranks and collect what each returns.

Usage::

    def _check(x):                      # module level, so it also works with spawn
        ...                              # torch.distributed is initialized here
        return some_picklable_result

    results = run_distributed(_check, world_size=4, args=(x,))   # one entry per rank

Why it looks like this (measured on 2-core CPU machines; ``docs/ARCHITECTURE.md``, "gloo on
CPU"):

* Ranks are **forked** from the test process (~0.2 s for 4 ranks; spawn or torchrun take
  8-19 s) and meet through a FileStore (TCPStore stalls 5 s in ~5% of start-ups).
* Every rank runs with one intra-op thread: a child forked after the parent ran a
  multi-threaded op hangs on its first matmul otherwise.
* A hang never blocks the suite: the parent waits on a queue with a deadline, kills every
  rank when it passes, and fails with the ranks that had not finished. An exception on
  any rank (including ``BaseException``) fails the test with that rank's traceback.

Device and backend: ``MEGACORE_TEST_DEVICE=cuda`` (or ``pytest --device cuda``) runs the
same tests with NCCL on GPUs, starting ranks with ``spawn`` because CUDA cannot be used in
a forked child.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue as queue_module
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

DEFAULT_TIMEOUT_S = 120.0


def selected_device() -> str:
    """``"cpu"`` (default) or ``"cuda"``, chosen by ``MEGACORE_TEST_DEVICE``."""
    return os.environ.get("MEGACORE_TEST_DEVICE", "cpu")


def _rank_main(fn, rank, world_size, init_file, backend, timeout_s, args, kwargs, results):
    torch.set_num_threads(1)
    outcome: tuple
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.distributed.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(*args, **kwargs)
        outcome = (rank, "ok", pickle.dumps(value))
    except BaseException:  # noqa: BLE001 - DCP raises BaseException subclasses
        outcome = (rank, "error", traceback.format_exc())
    finally:
        _cleanup()
    results.put(outcome)


def _cleanup():
    from megacore import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort during teardown
            pass


# gloo's TCP mesh set-up between freshly forked ranks very rarely fails with "connection
# closed by peer" (seen once in hundreds of runs on a loaded machine). That is transport
# set-up, not the code under test, so such a run is repeated once; anything else fails.
_TRANSPORT_SETUP_FAILURE = "connectFullMesh failed"


def run_distributed(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (),
                    kwargs: Optional[Dict[str, Any]] = None,
                    timeout: float = DEFAULT_TIMEOUT_S) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the values by rank.

    Raises ``AssertionError`` with the failing rank's traceback, or naming the ranks that
    were still running when ``timeout`` seconds passed.
    """
    try:
        return _run_once(fn, world_size, args, kwargs, timeout)
    except AssertionError as error:
        if _TRANSPORT_SETUP_FAILURE not in str(error):
            raise
        sys.stderr.write(f"{fn.__name__}: gloo transport set-up failed; running it again\n")
        return _run_once(fn, world_size, args, kwargs, timeout)


def _run_once(fn, world_size, args, kwargs, timeout) -> List[Any]:
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be in 1..8, got {world_size}")
    device = selected_device()
    backend = "nccl" if device == "cuda" else "gloo"
    ctx = multiprocessing.get_context("spawn" if device == "cuda" else "fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="megacore-rdzv-") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(fn, rank, world_size, init_file, backend, timeout,
                                   tuple(args), dict(kwargs or {}), results))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout, fn)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(timeout=5)


def _collect(procs, results, world_size, timeout, fn) -> List[Any]:
    deadline = time.monotonic() + timeout
    values: Dict[int, Any] = {}
    errors: Dict[int, str] = {}
    while len(values) + len(errors) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pending = sorted(set(range(world_size)) - set(values) - set(errors))
            raise AssertionError(
                f"{fn.__name__}: timed out after {timeout:.0f}s; ranks {pending} did not "
                f"finish (a hang, e.g. mismatched collectives)" + _format_errors(errors))
        try:
            rank, status, payload = results.get(timeout=min(remaining, 1.0))
        except queue_module.Empty:
            dead = [r for r, p in enumerate(procs)
                    if not p.is_alive() and r not in values and r not in errors]
            if dead and results.empty():
                time.sleep(0.5)  # let a message already in flight arrive
                if results.empty():
                    codes = {r: procs[r].exitcode for r in dead}
                    raise AssertionError(f"{fn.__name__}: ranks died without a result "
                                         f"(exit codes {codes})" + _format_errors(errors))
            continue
        if status == "ok":
            values[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
            # One failure usually leaves the others blocked in a collective (or failing as a
            # symptom of it): give them a moment to report, then stop.
            _drain(results, errors, values, grace=2.0)
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}"
                                 + _format_errors(errors))
    return [values[r] for r in range(world_size)]


def _drain(results, errors, values, grace):
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            rank, status, payload = results.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue_module.Empty:
            return
        if status == "ok":
            values[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload


def _format_errors(errors: Dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
