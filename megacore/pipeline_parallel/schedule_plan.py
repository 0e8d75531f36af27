"""Per-rank operation orders of the pipeline schedules, as data, and a simulator for them.

The schedules in :mod:`megacore.pipeline_parallel.schedules` do not decide *what* to run
next while they run: a pure function here computes each rank's whole order up front as a
list of :class:`Step` ``(phase, op, microbatch, chunk)``, and the runtime walks that list.
Because the order is data, it is tested without processes: :func:`simulate` runs the
orders of every stage together with message queues between them and proves that they
finish (no deadlock), that every received tensor is the one expected, and that each
forward precedes its backward.

Terms: ``pp`` pipeline ranks, ``vpp`` model chunks per rank (virtual stages), ``m``
micro-batches. Chunk ``c`` on rank ``r`` is *virtual stage* ``v = c * pp + r``; virtual
stage ``v`` feeds ``v + 1``, so activations flow ``rank 0 -> 1 -> ... -> pp-1 -> 0`` (next
chunk) and gradients flow back.

Ops: ``forward`` / ``backward`` are compute; ``recv_forward`` (input activation from the
previous virtual stage), ``send_forward`` (output activation to the next),
``recv_backward`` (output gradient from the next) and ``send_backward`` (input gradient to
the previous) are communication. **Consecutive communication steps form one batch**: the
runtime posts all of a batch's sends and receives together (``batch_isend_irecv``) and
waits for all of them, which is what makes pairs like ``send_forward`` +
``recv_backward`` on neighbouring ranks meet instead of both blocking.

Placement rule: between two compute steps ``a`` and ``b``, the batch holds ``a``'s output
send and ``b``'s input receive (Megatron's ``send_forward_recv_backward`` and friends).
In the interleaved steady state a forward and a backward run back to back and one batch
then carries all four transfers (Megatron's ``send_forward_backward_recv_forward_backward``);
placing them one step at a time there deadlocks (found with :func:`simulate`).
Example, ``pp=2``, ``m=3``, no interleaving (``F``/``B`` compute, ``[...]`` a batch)::

    rank 0:        F0 [sF0]    F1 [sF1 rB0] B0    F2 [sF2 rB1] B1 [rB2] B2
    rank 1:  [rF0] F0 B0 [rF1 sB0] F1 B1 [rF2 sB1] F2 B2 [sB2]

Within a batch, activation messages are ordered before gradient messages on both ends,
so with ``pp=2`` (where the next and previous rank are the same peer) the two messages on
one link are matched in the same order by sender and receiver.
"""

from __future__ import annotations

import collections
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

__all__ = [
    "Step",
    "FORWARD",
    "BACKWARD",
    "RECV_FORWARD",
    "SEND_FORWARD",
    "RECV_BACKWARD",
    "SEND_BACKWARD",
    "COMPUTE_OPS",
    "COMM_OPS",
    "ScheduleError",
    "validate_schedule_args",
    "microbatch_chunk_table",
    "num_warmup_microbatches",
    "compute_order",
    "build_plan",
    "group_batches",
    "simulate",
]

FORWARD = "forward"
BACKWARD = "backward"
RECV_FORWARD = "recv_forward"
SEND_FORWARD = "send_forward"
RECV_BACKWARD = "recv_backward"
SEND_BACKWARD = "send_backward"
COMPUTE_OPS = (FORWARD, BACKWARD)
# Order inside one batch: activations (forward direction) before gradients.
COMM_OPS = (SEND_FORWARD, RECV_FORWARD, SEND_BACKWARD, RECV_BACKWARD)


class Step(NamedTuple):
    """One entry of a rank's order.

    Attributes:
        phase: ``"warmup"``, ``"steady"`` or ``"cooldown"`` (for reading and timers).
        op: one of :data:`COMPUTE_OPS` or :data:`COMM_OPS`.
        microbatch: micro-batch index ``0 <= microbatch < m``.
        chunk: model chunk on this rank ``0 <= chunk < vpp``.
    """

    phase: str
    op: str
    microbatch: int
    chunk: int


class ScheduleError(RuntimeError):
    """A set of per-rank orders that would deadlock or exchange the wrong tensors."""


Batch = Tuple[Step, ...]


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
def validate_schedule_args(pipeline_model_parallel_size: int, num_microbatches: int,
                           virtual_pipeline_model_parallel_size: Optional[int] = None,
                           microbatch_group_size_per_vp_stage: Optional[int] = None) -> int:
    """Check a schedule's sizes before any communication; return the micro-batch group size.

    The interleaved schedule runs micro-batches on one chunk in groups of
    ``microbatch_group_size_per_vp_stage`` before moving to the next chunk. The group
    must be ``pp`` (the default): then a chunk's output returns to rank 0 exactly when
    rank 0 posts its receive. The number of micro-batches must be a multiple of ``pp``.

    Raises:
        ValueError: naming the flags to change.
    """
    pp, m = pipeline_model_parallel_size, num_microbatches
    vpp = virtual_pipeline_model_parallel_size
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"--pipeline-model-parallel-size must be >= 1, got {pp!r}")
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"num_microbatches must be >= 1 (--global-batch-size / "
                         f"(--micro-batch-size x data-parallel size)), got {m!r}")
    if vpp is None or vpp == 1:
        return 1
    if vpp < 1:
        raise ValueError(f"--num-virtual-stages-per-pipeline-rank must be >= 1, got {vpp}")
    if pp < 2:
        raise ValueError(f"interleaving (--num-virtual-stages-per-pipeline-rank={vpp}) needs "
                         f"--pipeline-model-parallel-size >= 2, got {pp}")
    group = pp if microbatch_group_size_per_vp_stage is None else microbatch_group_size_per_vp_stage
    if group != pp:
        # Measured with simulate(): any other group size lets a chunk's output reach rank 0
        # before rank 0 posts the matching receive, which deadlocks with batched p2p.
        raise ValueError(f"--microbatch-group-size-per-virtual-stage ({group}) must equal "
                         f"--pipeline-model-parallel-size ({pp}) in this implementation")
    if m % pp:
        raise ValueError(
            f"the interleaved schedule (--num-virtual-stages-per-pipeline-rank={vpp}) needs "
            f"the number of micro-batches ({m}; --global-batch-size / (--micro-batch-size x "
            f"data-parallel size)) to be a multiple of --pipeline-model-parallel-size ({pp})")
    return group


# --------------------------------------------------------------------------------------
# Compute order
# --------------------------------------------------------------------------------------
def microbatch_chunk_table(num_microbatches: int, num_chunks: int,
                           group_size: int) -> List[Tuple[int, int]]:
    """Forward order of ``(microbatch, chunk)`` pairs on every rank.

    Micro-batches go through chunk 0 in groups of ``group_size``, then the same group
    through chunk 1, and so on. Example ``m=4, vpp=2, group=2``::

        (0,0) (1,0) (0,1) (1,1) (2,0) (3,0) (2,1) (3,1)
    """
    table = []
    for start in range(0, num_microbatches, group_size):
        group = range(start, min(start + group_size, num_microbatches))
        table.extend((mb, chunk) for chunk in range(num_chunks) for mb in group)
    return table


def num_warmup_microbatches(pp_rank: int, pp_size: int, num_microbatches: int,
                            num_chunks: int = 1, group_size: int = 1) -> int:
    """Forward passes a rank runs before its first backward (Megatron's counts).

    Without interleaving rank ``r`` runs ``pp - r - 1`` forwards ahead (stage ``pp-1``
    none). With interleaving, ``2 * (pp - r - 1) + (vpp - 1) * group``: every chunk's
    first group must be in flight before the last chunk's first backward can return.
    """
    total = num_microbatches * num_chunks
    if num_chunks == 1:
        return min(pp_size - pp_rank - 1, total)
    return min(2 * (pp_size - pp_rank - 1) + (num_chunks - 1) * group_size, total)


def compute_order(pp_rank: int, pp_size: int, num_microbatches: int, num_chunks: int = 1,
                  group_size: Optional[int] = None, forward_only: bool = False) -> List[Step]:
    """The compute steps of one rank: warm-up forwards, steady 1F1B, cool-down backwards."""
    group = pp_size if group_size is None else group_size
    forwards = microbatch_chunk_table(num_microbatches, num_chunks, group)
    if forward_only:
        return [Step("warmup", FORWARD, mb, c) for mb, c in forwards]
    # Backwards run the chunks in reverse: the last virtual stage's gradient comes first.
    backwards = [(mb, num_chunks - 1 - c) for mb, c in forwards]
    warmup = num_warmup_microbatches(pp_rank, pp_size, num_microbatches, num_chunks, group)
    steps = [Step("warmup", FORWARD, mb, c) for mb, c in forwards[:warmup]]
    for k in range(len(forwards) - warmup):
        steps.append(Step("steady", FORWARD, *forwards[warmup + k]))
        steps.append(Step("steady", BACKWARD, *backwards[k]))
    steps.extend(Step("cooldown", BACKWARD, mb, c)
                 for mb, c in backwards[len(forwards) - warmup:])
    return steps


# --------------------------------------------------------------------------------------
# Communication placement
# --------------------------------------------------------------------------------------
def _is_first_virtual(pp_rank: int, chunk: int) -> bool:
    return pp_rank == 0 and chunk == 0


def _is_last_virtual(pp_rank: int, pp_size: int, chunk: int, num_chunks: int) -> bool:
    return pp_rank == pp_size - 1 and chunk == num_chunks - 1


def _input_recv(step: Step, pp_rank: int, pp_size: int, num_chunks: int) -> Optional[Step]:
    """The receive that delivers ``step``'s input (None on the pipeline's ends)."""
    if step.op == FORWARD and not _is_first_virtual(pp_rank, step.chunk):
        return Step(step.phase, RECV_FORWARD, step.microbatch, step.chunk)
    if step.op == BACKWARD and not _is_last_virtual(pp_rank, pp_size, step.chunk, num_chunks):
        return Step(step.phase, RECV_BACKWARD, step.microbatch, step.chunk)
    return None


def _output_send(step: Step, pp_rank: int, pp_size: int, num_chunks: int) -> Optional[Step]:
    """The send that delivers ``step``'s output (None on the pipeline's ends)."""
    if step.op == FORWARD and not _is_last_virtual(pp_rank, pp_size, step.chunk, num_chunks):
        return Step(step.phase, SEND_FORWARD, step.microbatch, step.chunk)
    if step.op == BACKWARD and not _is_first_virtual(pp_rank, step.chunk):
        return Step(step.phase, SEND_BACKWARD, step.microbatch, step.chunk)
    return None


def _ordered(batch: List[Step]) -> List[Step]:
    return sorted(batch, key=lambda s: COMM_OPS.index(s.op))


def _compute_groups(compute: List[Step], num_chunks: int) -> List[List[Step]]:
    """Compute steps that run back to back with no communication between them.

    Interleaved steady state runs one forward and one backward per iteration and then
    exchanges all four tensors at once (Megatron's
    ``send_forward_backward_recv_forward_backward``); elsewhere every step is alone.
    """
    groups: List[List[Step]] = []
    for step in compute:
        pair = (num_chunks > 1 and step.phase == "steady" and step.op == BACKWARD)
        if pair:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def build_plan(pp_rank: int, pp_size: int, num_microbatches: int, num_chunks: int = 1,
                  group_size: Optional[int] = None, forward_only: bool = False) -> List[Step]:
    """Full order of one rank: compute steps with the communication placed between them.

    Between two groups of compute steps (see the module docstring) one batch carries the
    first group's output sends and the second group's input receives. Arguments are
    validated with :func:`validate_schedule_args` (``ValueError`` naming the flags).
    """
    group = validate_schedule_args(pp_size, num_microbatches, num_chunks, group_size)
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} is outside 0..{pp_size - 1}")
    compute = compute_order(pp_rank, pp_size, num_microbatches, num_chunks,
                            group if num_chunks > 1 else None, forward_only)
    plan: List[Step] = []
    previous: List[Step] = []
    for current in _compute_groups(compute, num_chunks) + [[]]:
        batch = [_output_send(s, pp_rank, pp_size, num_chunks) for s in previous]
        batch += [_input_recv(s, pp_rank, pp_size, num_chunks) for s in current]
        plan.extend(_ordered([s for s in batch if s is not None]))
        plan.extend(current)
        previous = current
    return plan


def group_batches(plan: Sequence[Step]) -> List[Union[Step, Batch]]:
    """Split a plan into compute steps and batches (tuples of consecutive comm steps)."""
    out: List[Union[Step, Batch]] = []
    pending: List[Step] = []
    for step in plan:
        if step.op in COMM_OPS:
            pending.append(step)
            continue
        if pending:
            out.append(tuple(pending))
            pending = []
        out.append(step)
    if pending:
        out.append(tuple(pending))
    return out


# --------------------------------------------------------------------------------------
# Simulator
# --------------------------------------------------------------------------------------
def _message(step: Step, pp_rank: int, pp_size: int) -> Tuple[str, int, Tuple[str, int, int]]:
    """``(direction, peer, label)`` of a comm step; the label names the receiving stage.

    Sender and receiver compute the same label for the same tensor, so a mismatch means
    the two ends would pair different tensors.
    """
    virtual = step.chunk * pp_size + pp_rank
    if step.op == SEND_FORWARD:
        return "send", (pp_rank + 1) % pp_size, ("activation", step.microbatch, virtual + 1)
    if step.op == RECV_FORWARD:
        return "recv", (pp_rank - 1) % pp_size, ("activation", step.microbatch, virtual)
    if step.op == SEND_BACKWARD:
        return "send", (pp_rank - 1) % pp_size, ("gradient", step.microbatch, virtual - 1)
    return "recv", (pp_rank + 1) % pp_size, ("gradient", step.microbatch, virtual)


class _Link:
    """Messages on one directed link, matched first-posted to first-posted."""

    def __init__(self):
        self.sends: List[Tuple[str, int, int]] = []
        self.recvs: List[Tuple[str, int, int]] = []

    def matched(self, index: int) -> bool:
        return index < len(self.sends) and index < len(self.recvs)


def simulate(plans: Sequence[Sequence[Step]], num_chunks: int = 1) -> Dict[str, int]:
    """Run every rank's plan together; raise :class:`ScheduleError` unless it is sound.

    Model (the strictest realistic one, NCCL-like): a rank posts all operations of its
    current batch at once and moves on only when every one of them has met its partner;
    a send completes only when the matching receive is posted (no buffering). Messages on
    each directed link pair up in posting order, and the sender's and receiver's labels
    must agree. Compute steps take no time. Also checks that each ``(microbatch, chunk)``
    runs forward once and, if it runs backward, after its forward.

    Returns:
        ``{"rounds": ..., "batches": ...}``: rounds of progress and batches completed.
    """
    pp = len(plans)
    programs = [group_batches(plan) for plan in plans]
    links: Dict[Tuple[int, int], _Link] = collections.defaultdict(_Link)
    position = [0] * pp
    # For a rank blocked in a batch: [(link key, index in that link's queue)].
    posted: List[Optional[List[Tuple[Tuple[int, int], int]]]] = [None] * pp
    done_compute: List[Dict[Tuple[str, int, int], int]] = [dict() for _ in range(pp)]
    rounds = batches = 0
    while any(position[r] < len(programs[r]) for r in range(pp)):
        rounds += 1
        progressed = False
        for r in range(pp):
            while position[r] < len(programs[r]):
                item = programs[r][position[r]]
                if isinstance(item, Step):
                    _record_compute(item, r, done_compute[r])
                elif not _advance_batch(item, r, pp, links, posted):
                    break
                else:
                    batches += 1
                position[r] += 1
                progressed = True
        if not progressed:
            raise ScheduleError(_deadlock_report(programs, position))
    _check_links(links)
    return {"rounds": rounds, "batches": batches}


def _record_compute(step: Step, rank: int, done: Dict[Tuple[str, int, int], int]) -> None:
    key = (step.op, step.microbatch, step.chunk)
    if key in done:
        raise ScheduleError(f"rank {rank} runs {step.op} of micro-batch {step.microbatch} "
                            f"chunk {step.chunk} twice")
    if step.op == BACKWARD and (FORWARD, step.microbatch, step.chunk) not in done:
        raise ScheduleError(f"rank {rank} runs backward of micro-batch {step.microbatch} "
                            f"chunk {step.chunk} before its forward")
    done[key] = len(done)


def _advance_batch(batch: Batch, rank: int, pp: int, links, posted) -> bool:
    """Post ``batch`` (once) and report whether all its messages have met their partner."""
    if posted[rank] is None:
        entries = []
        for step in batch:
            direction, peer, label = _message(step, rank, pp)
            key = (rank, peer) if direction == "send" else (peer, rank)
            queue = links[key].sends if direction == "send" else links[key].recvs
            queue.append(label)
            index = len(queue) - 1
            link = links[key]
            if link.matched(index) and link.sends[index] != link.recvs[index]:
                raise ScheduleError(f"link {key[0]}->{key[1]} message {index}: sender sends "
                                    f"{link.sends[index]} but receiver expects "
                                    f"{link.recvs[index]}")
            entries.append((key, index))
        posted[rank] = entries
    if all(links[key].matched(index) for key, index in posted[rank]):
        posted[rank] = None
        return True
    return False


def _check_links(links) -> None:
    for (src, dst), link in links.items():
        if len(link.sends) != len(link.recvs):
            raise ScheduleError(f"link {src}->{dst}: {len(link.sends)} sends but "
                                f"{len(link.recvs)} receives")


def _deadlock_report(programs, position) -> str:
    lines = ["deadlock: no rank can make progress"]
    for r, program in enumerate(programs):
        where = program[position[r]] if position[r] < len(program) else "finished"
        lines.append(f"  rank {r} waits in {where}")
    return "\n".join(lines)
