"""Background checkpoint writes and their finalization.

An asynchronous save collects the state synchronously (the collectives, and a CPU copy of
every tensor, so training may change the params right after), then writes files in a
background thread: ``torch.save`` for the legacy format, ``dcp.save`` on a gloo group of
its own (so its background collectives never interleave with training's) for the
distributed one.

Finalizing waits for the local writes, agrees over all ranks that every write succeeded,
and only then lets rank 0 write the tracker file: until then the previous checkpoint stays
the latest one. :func:`finalize_async_saves` is collective; the training loop calls it
(non-blocking) every iteration and blocking before exit, and every save finalizes the
previous one first, so at most one save is in flight.

Module state: the one pending save must outlive the call that started it (the training
loop holds no handle), so it lives here, like the default grid lives in
``parallel_state``. :class:`AsyncSaveHandle` is the object behind it.
"""

from __future__ import annotations

import threading
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from megacore.checkpointing.errors import CheckpointError
from megacore.checkpointing.parallel_layout import RankLayout

__all__ = ["AsyncSaveHandle", "finalize_async_saves", "has_pending_async_save",
           "agree_success", "agree_no_problem", "set_pending", "async_process_group",
           "reset_async_state"]


def agree_success(layout: RankLayout, ok: bool) -> bool:
    """True when ``ok`` on every rank (one all-reduce; collective)."""
    if not layout.is_distributed or layout.world_size == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def agree_no_problem(layout: RankLayout, problem: Optional[str]) -> None:
    """Raise :class:`CheckpointError` on every rank when any rank found a problem (a lone
    raise would leave the other ranks waiting in their next collective; collective)."""
    problems = [problem]
    if layout.is_distributed and layout.world_size > 1:
        problems = [None] * layout.world_size
        dist.all_gather_object(problems, problem)
    found = [p for p in problems if p]
    if found:
        raise CheckpointError(found[0] if len(set(found)) == 1
                              else "\n".join(sorted(set(found))))


class AsyncSaveHandle:
    """One background save: local writes to wait for, then a finalize step.

    Args:
        layout: the saving rank's layout (for the agreement all-reduce).
        finalize: runs once every rank's writes succeeded (rank 0 writes the tracker).
        description: for error messages (e.g. the iteration directory).
    """

    def __init__(self, layout: RankLayout, finalize: Callable[[], None], description: str):
        self.layout = layout
        self._finalize = finalize
        self.description = description
        self._threads: List[threading.Thread] = []
        self._futures: List = []
        self._errors: List[BaseException] = []

    def add_thread_job(self, job: Callable[[], None]) -> None:
        """Run ``job`` in a background thread (non-daemon: an exit still completes it)."""
        def run():
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - reported at finalize
                self._errors.append(exc)

        thread = threading.Thread(target=run, name="megacore-ckpt-writer")
        thread.start()
        self._threads.append(thread)

    def add_future(self, future) -> None:
        """Wait for a ``concurrent.futures.Future`` (DCP's async save)."""
        self._futures.append(future)

    def done_locally(self) -> bool:
        return not any(t.is_alive() for t in self._threads) and \
            all(f.done() for f in self._futures)

    def wait_locally(self) -> None:
        for thread in self._threads:
            thread.join()
        for future in self._futures:
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001
                self._errors.append(exc)

    def finalize(self) -> None:
        """Wait, agree on success over all ranks, then finalize (collective)."""
        self.wait_locally()
        if not agree_success(self.layout, not self._errors):
            cause = self._errors[0] if self._errors else None
            raise CheckpointError(f"asynchronous save to {self.description} failed on at "
                                  "least one rank; the previous checkpoint remains the "
                                  f"latest ({cause!r} here)") from cause
        self._finalize()


_PENDING: Optional[AsyncSaveHandle] = None
# (the default process group it was created in, the gloo group). A process group does not
# outlive destroy_process_group: the pair lets a new world get a new group.
_ASYNC_GROUP: Optional[tuple] = None


def set_pending(handle: AsyncSaveHandle) -> None:
    global _PENDING
    if _PENDING is not None:
        raise RuntimeError("an asynchronous save is already pending: finalize it first")
    _PENDING = handle


def has_pending_async_save() -> bool:
    return _PENDING is not None


def async_process_group(layout: RankLayout):
    """A gloo group over the world for DCP's background collectives (created once, by a
    collective call on every rank, with the model-parallel groups' timeout; None without
    a process group)."""
    global _ASYNC_GROUP
    if not layout.is_distributed:
        return None
    world = dist.group.WORLD
    if _ASYNC_GROUP is None or _ASYNC_GROUP[0] is not world:
        # First use, or the world was destroyed and created again since: the cached group
        # belongs to a dead world, and a collective on it would fail or hang.
        timeout = layout.groups.timeout if layout.groups is not None else None
        _ASYNC_GROUP = (world, dist.new_group(backend="gloo", timeout=timeout))
    return _ASYNC_GROUP[1]


def finalize_async_saves(blocking: bool = True) -> bool:
    """Finalize the pending background save if there is one (collective: call it on all
    ranks at the same point). Non-blocking, it finalizes only when every rank's writes
    are done. Returns True when a save was finalized.

    Raises:
        CheckpointError: a background write failed on some rank (the tracker was not
            updated).
    """
    global _PENDING
    handle = _PENDING
    if handle is None:
        return False
    if not blocking and not agree_success(handle.layout, handle.done_locally()):
        return False
    _PENDING = None
    handle.finalize()
    return True


def reset_async_state() -> None:
    """Forget the pending save and the async group (after destroying process groups)."""
    global _PENDING, _ASYNC_GROUP
    _PENDING = None
    _ASYNC_GROUP = None

