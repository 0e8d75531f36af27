"""A request queue in front of the controller: batching on rank 0, following on the others.

The HTTP server (``megacore.inference.server``) runs on global rank 0 only. Its
handlers :meth:`GenerationService.submit` requests, which a single worker thread
collects into batches (whatever is queued, up to ``max_batch_size`` rows, after waiting
``batch_wait_s`` for company) and runs through
:meth:`~megacore.inference.TextGenerationController.generate`. Before each batch the
worker broadcasts a command to every other rank, which sits in :func:`follow_requests`
and runs the same ``generate`` call (the controller's collectives need all ranks)::

    rank 0:   HTTP -> queue -> worker: broadcast("generate", rows) -> generate -> futures
    rank r>0: follow_requests: receive command -> generate (results dropped)

While idle the worker sends a ``noop`` every ``heartbeat_s`` so the followers' blocking
broadcast never reaches the process-group timeout; ``stop`` ends the followers.

:meth:`GenerationService.cancel` withdraws a submission whose caller went away (a
disconnected streaming client): still queued, it is dropped; running, its rows stop at
the next step (every rank agrees, see ``TextGenerationController.generate``) and the
batch ends as soon as its remaining rows do.

A failure inside one batch fails that batch's futures (the server answers 500) and the
worker goes on with the next batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import List, Optional, Sequence

import torch.distributed as dist

from megacore.inference.inference_request import GenerationRequest, GenerationResult
from megacore.inference.text_generation_controller import (
    TextGenerationController,
    TokenCallback,
)

__all__ = ["GenerationService", "ServiceConfig", "QueueFullError", "GenerationCancelled",
           "follow_requests"]

logger = logging.getLogger(__name__)

_GENERATE, _NOOP, _STOP = "generate", "noop", "stop"


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queued_requests`` allows."""


class GenerationCancelled(RuntimeError):
    """The submission was cancelled before its batch started."""


@dataclasses.dataclass
class ServiceConfig:
    """Batching and liveness settings of a :class:`GenerationService`."""

    batch_wait_s: float = 0.002
    """How long the worker waits for more requests before starting a batch (adds to the
    latency of a lone request; lets concurrent requests share a batch)."""

    max_queued_requests: int = 1024
    """Requests waiting beyond this are refused (the server answers 503)."""

    heartbeat_s: float = 60.0
    """Idle interval after which rank 0 pings the followers; keep it well under the
    process-group timeout."""

    def __post_init__(self):
        if self.batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {self.batch_wait_s}")
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")


@dataclasses.dataclass
class _Job:
    requests: List[GenerationRequest]
    future: concurrent.futures.Future
    on_token: Optional[TokenCallback]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


def _no_rows() -> Sequence[int]:
    return ()


def _broadcast_command(command, group=None) -> object:
    """Rank 0's ``command`` on every rank of ``group`` (default: the world)."""
    box = [command]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class GenerationService:
    """Queue and worker thread on rank 0 (see the module docstring).

    Args:
        controller: the generation controller (built on every rank).
        config: batching settings.
        group: the ranks that follow rank 0 (default: the world, when initialized).
    """

    def __init__(self, controller: TextGenerationController,
                 config: Optional[ServiceConfig] = None, *, group=None):
        self.controller = controller
        self.config = config or ServiceConfig()
        self.group = group
        self._distributed = dist.is_initialized() and dist.get_world_size(group) > 1
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._jobs: "dict[int, _Job]" = {}  # id(future) -> job, until the job ends
        self._jobs_lock = threading.Lock()
        self.batches_run = 0

    @property
    def max_batch_size(self) -> int:
        return self.controller.config.max_batch_size

    def queued(self) -> int:
        return self._queue.qsize()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> "GenerationService":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="generation-worker",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued work, release the followers and end the worker."""
        if self._thread is None:
            return
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    # -- submitting ---------------------------------------------------------------------
    def submit(self, requests: Sequence[GenerationRequest],
               on_token: Optional[TokenCallback] = None) -> concurrent.futures.Future:
        """Queue requests (validated here); the future gets their results in order.

        ``on_token(i, token, logprob)`` is called from the worker thread with ``i``
        indexing ``requests``.

        Raises:
            ValueError: a request the controller would reject.
            QueueFullError: too many requests waiting.
            RuntimeError: the service is not running.
        """
        requests = list(requests)
        if not requests or len(requests) > self.max_batch_size:
            raise ValueError(f"a submission needs 1 to {self.max_batch_size} requests, got "
                             f"{len(requests)}")
        for index, request in enumerate(requests):
            self.controller.validate_request(request, index)
        if self._thread is None or self._stopping.is_set():
            raise RuntimeError("the generation service is not running")
        if self._queue.qsize() >= self.config.max_queued_requests:
            raise QueueFullError(f"{self._queue.qsize()} requests are waiting (limit "
                                 f"{self.config.max_queued_requests}); retry later")
        future: concurrent.futures.Future = concurrent.futures.Future()
        job = _Job(requests, future, on_token)
        with self._jobs_lock:
            self._jobs[id(future)] = job
        future.add_done_callback(self._forget)
        self._queue.put(job)
        return future

    def cancel(self, future: concurrent.futures.Future) -> bool:
        """Withdraw the submission behind ``future`` (see the module docstring).

        Returns:
            False if it had already finished.
        """
        with self._jobs_lock:
            job = self._jobs.get(id(future))
        if job is None or future.done():
            return False
        job.cancelled.set()
        return True

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._jobs_lock:
            self._jobs.pop(id(future), None)

    # -- worker -------------------------------------------------------------------------
    def _run(self) -> None:
        pending: Optional[_Job] = None
        while True:
            jobs, pending, stop = self._next_batch(pending)
            if jobs:
                self._run_batch(jobs)
            elif not stop and self._distributed:
                _broadcast_command((_NOOP,), self.group)
            if stop:
                break
        if self._distributed:
            _broadcast_command((_STOP,), self.group)

    def _next_batch(self, pending: Optional[_Job]):
        """Jobs for one batch, a job left over for the next, and whether to stop."""
        first = pending
        if first is None:
            try:
                first = self._queue.get(timeout=self.config.heartbeat_s)
            except queue.Empty:
                return [], None, False
        if first is None:
            return [], None, True
        jobs, rows = [first], len(first.requests)
        deadline = time.monotonic() + self.config.batch_wait_s
        while rows < self.max_batch_size:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            if rows + len(job.requests) > self.max_batch_size:
                return jobs, job, False
            jobs.append(job)
            rows += len(job.requests)
        return jobs, None, False

    def _run_batch(self, jobs: List[_Job]) -> None:
        for job in [j for j in jobs if j.cancelled.is_set()]:
            job.future.set_exception(GenerationCancelled("cancelled before it started"))
        jobs = [j for j in jobs if not j.cancelled.is_set()]
        if not jobs:
            return
        requests = [r for job in jobs for r in job.requests]
        owners = [(j, i) for j, job in enumerate(jobs) for i in range(len(job.requests))]

        def on_token(row: int, token: int, logprob: float) -> None:
            job_index, local = owners[row]
            callback = jobs[job_index].on_token
            if callback is not None:
                try:
                    callback(local, token, logprob)
                except Exception:  # noqa: BLE001 - a broken stream must not stop the batch
                    logger.exception("token callback failed")

        def cancelled() -> List[int]:
            return [row for row, (j, _) in enumerate(owners) if jobs[j].cancelled.is_set()]

        try:
            if self._distributed:
                _broadcast_command((_GENERATE, requests), self.group)
            results: List[GenerationResult] = self.controller.generate(requests, on_token,
                                                                       cancelled)
        except Exception as error:  # noqa: BLE001 - reported to every waiting request
            logger.exception("generation failed for a batch of %d requests", len(requests))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self.batches_run += 1
        start = 0
        for job in jobs:
            job.future.set_result(results[start:start + len(job.requests)])
            start += len(job.requests)


def follow_requests(controller: TextGenerationController, group=None) -> int:
    """Run rank 0's generation commands on this rank until it sends ``stop``.

    Returns:
        The number of batches run.
    """
    batches = 0
    while True:
        command = _broadcast_command(None, group)
        kind = command[0]
        if kind == _STOP:
            return batches
        if kind == _GENERATE:
            try:
                controller.generate(command[1], cancelled=_no_rows)
            except Exception:  # noqa: BLE001 - rank 0 reports the failure; keep following
                logger.exception("generation failed on a follower rank")
            batches += 1
