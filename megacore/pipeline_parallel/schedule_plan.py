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

The zero-bubble schedule ZB-H1 (``schedule="zb-h1"``) splits each backward into
``backward_input`` (B: the input gradient, sent on at once) and ``backward_weight`` (W:
the weight gradients, which nobody waits for), see :mod:`.backward_split`. Its compute
order (:func:`zero_bubble_compute_order`) is 1F1B's with the W steps placed where 1F1B
would wait; it keeps 1F1B's ``pp - r`` forwards ahead on rank ``r`` and 1F1B's peak
activation memory (at most ``pp`` micro-batches between F and W on any rank). Its sends
are *eager*: a batch waits for its receives and for the previous batch's sends, not for
its own sends, so a rank runs W steps while its last output is on the way. Example,
``pp=2``, ``m=3`` (``B``/``W`` the two halves of a backward)::

    rank 0:       F0 [sF0]    F1 [sF1 rB0] B0 W0 F2 [sF2 rB1] B1 W1 [rB2] B2 W2
    rank 1: [rF0] F0 B0 [rF1 sB0] F1 B1 [sB1] W0 [rF2] F2 B2 [sB2] W1 W2

Timed with unit costs, these plans give exactly the paper's ZB-H1 bubble whenever
``m >= pp`` (``benchmarks/bench_pipeline_bubble.py``).

:func:`simulate` with ``costs`` also times the plans under the same strict p2p model and
reports the bubble fraction ``1 - busy / (pp * makespan)``; with F = 1 and a whole
backward = 2 it reproduces the published 1F1B bubble ``(pp - 1) / (m + pp - 1)``.
"""

from __future__ import annotations

import collections
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

__all__ = [
    "Step",
    "StageLayout",
    "FORWARD",
    "BACKWARD",
    "BACKWARD_INPUT",
    "BACKWARD_WEIGHT",
    "RECV_FORWARD",
    "SEND_FORWARD",
    "RECV_BACKWARD",
    "SEND_BACKWARD",
    "HANDOFF_FORWARD",
    "HANDOFF_BACKWARD",
    "HANDOFF_OPS",
    "COMPUTE_OPS",
    "COMM_OPS",
    "PIPELINE_SCHEDULES",
    "ScheduleError",
    "validate_schedule_args",
    "validate_pipeline_schedule",
    "microbatch_chunk_table",
    "num_warmup_microbatches",
    "compute_order",
    "zero_bubble_compute_order",
    "zbv_compute_order",
    "stage_layout",
    "build_plan",
    "group_batches",
    "simulate",
    "published_bubble_fraction",
]

FORWARD = "forward"
BACKWARD = "backward"
BACKWARD_INPUT = "backward_input"
BACKWARD_WEIGHT = "backward_weight"
RECV_FORWARD = "recv_forward"
SEND_FORWARD = "send_forward"
RECV_BACKWARD = "recv_backward"
SEND_BACKWARD = "send_backward"
# ZBV: the last rank's chunk 0 feeds its own chunk 1 (and chunk 1's input gradient goes
# back to chunk 0) through memory, with no message.
HANDOFF_FORWARD = "handoff_forward"
HANDOFF_BACKWARD = "handoff_backward"
HANDOFF_OPS = (HANDOFF_FORWARD, HANDOFF_BACKWARD)
COMPUTE_OPS = (FORWARD, BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT)
# Order inside one batch: activations (forward direction) before gradients.
COMM_OPS = (SEND_FORWARD, RECV_FORWARD, SEND_BACKWARD, RECV_BACKWARD)
# The ops that receive an output gradient and send an input gradient.
_GRADIENT_OPS = (BACKWARD, BACKWARD_INPUT)

PIPELINE_SCHEDULES = ("1f1b", "interleaved-1f1b", "zb-h1", "zbv")
"""Values of ``--pipeline-schedule``. ``1f1b`` and ``interleaved-1f1b`` are today's
schedules (which of the two runs follows ``--num-virtual-stages-per-pipeline-rank``);
``zb-h1`` splits backwards into B and W (zero bubble); ``zbv`` also splits them and
places two chunks per rank in a V (:func:`zbv_compute_order`)."""

ZBV_NUM_CHUNKS = 2
"""ZBV holds exactly two model chunks per rank: the two arms of the V."""


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


class StageLayout(NamedTuple):
    """Where each virtual stage lives.

    Interleaved (``v_shape=False``): chunk ``c`` of rank ``r`` is stage ``c * pp + r``.
    Example ``pp=4``, two chunks: rank 0 holds stages 0 and 4, rank 3 holds 3 and 7.

    ZBV (``v_shape=True``, two chunks): chunk 0 of rank ``r`` is stage ``r`` and chunk 1
    is stage ``2 pp - 1 - r``. Example ``pp=4``: rank 0 holds stages 0 and 7, rank 3
    holds 3 and 4; activations go ``0 -> 1 -> 2 -> 3 -> (rank 3, chunk 1) -> 2 -> 1 -> 0``,
    and the loss is computed on rank 0.
    """

    pp_size: int
    num_chunks: int = 1
    v_shape: bool = False

    @property
    def num_stages(self) -> int:
        return self.pp_size * self.num_chunks

    def stage(self, pp_rank: int, chunk: int) -> int:
        if self.v_shape and chunk == 1:
            return 2 * self.pp_size - 1 - pp_rank
        return chunk * self.pp_size + pp_rank

    def place(self, stage: int) -> Tuple[int, int]:
        """``(pp_rank, chunk)`` of a stage."""
        if self.v_shape and stage >= self.pp_size:
            return 2 * self.pp_size - 1 - stage, 1
        return stage % self.pp_size, stage // self.pp_size

    def is_first(self, pp_rank: int, chunk: int) -> bool:
        return self.stage(pp_rank, chunk) == 0

    def is_last(self, pp_rank: int, chunk: int) -> bool:
        return self.stage(pp_rank, chunk) == self.num_stages - 1

    def neighbour(self, pp_rank: int, chunk: int, offset: int) -> Tuple[int, int]:
        """``(pp_rank, chunk)`` of the stage ``offset`` (+1 next, -1 previous) away."""
        return self.place(self.stage(pp_rank, chunk) + offset)


def stage_layout(schedule: Optional[str], pp_size: int, num_chunks: int = 1) -> StageLayout:
    """The stage layout a schedule runs on (V-shaped for ``zbv``)."""
    return StageLayout(pp_size, num_chunks, v_shape=schedule == "zbv")


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


def validate_pipeline_schedule(schedule: Optional[str], pipeline_model_parallel_size: int,
                               num_chunks: Optional[int]) -> str:
    """Resolve ``--pipeline-schedule`` against the layout; return the schedule to run.

    ``None`` keeps today's choice: ``interleaved-1f1b`` with several chunks per rank,
    else ``1f1b``. ``zb-h1`` runs one chunk per rank, ``zbv`` exactly two.

    Raises:
        ValueError: naming the flags to change.
    """
    chunks = num_chunks or 1
    if schedule is None:
        return "interleaved-1f1b" if chunks > 1 else "1f1b"
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"--pipeline-schedule must be one of {', '.join(PIPELINE_SCHEDULES)}; "
                         f"got {schedule!r}")
    del pipeline_model_parallel_size  # a one-stage plan is valid (the degenerate case)
    if schedule in ("1f1b", "zb-h1") and chunks > 1:
        raise ValueError(f"--pipeline-schedule {schedule} runs one model chunk per rank; drop "
                         f"--num-virtual-stages-per-pipeline-rank={chunks}"
                         + (" (or use --pipeline-schedule interleaved-1f1b)"
                            if schedule == "1f1b" else ""))
    if schedule == "zbv" and chunks != ZBV_NUM_CHUNKS:
        raise ValueError(f"--pipeline-schedule zbv runs exactly {ZBV_NUM_CHUNKS} model chunks "
                         f"per rank (a V); set --num-virtual-stages-per-pipeline-rank "
                         f"{ZBV_NUM_CHUNKS} (got {chunks})")
    if schedule == "interleaved-1f1b" and chunks < 2:
        raise ValueError("--pipeline-schedule interleaved-1f1b needs "
                         "--num-virtual-stages-per-pipeline-rank >= 2")
    return schedule


# --------------------------------------------------------------------------------------
# Compute order: 1F1B and interleaved 1F1B
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
# Compute order: ZB-H1
# --------------------------------------------------------------------------------------
def zero_bubble_compute_order(pp_rank: int, pp_size: int, num_microbatches: int,
                              forward_only: bool = False) -> List[Step]:
    """The compute steps of one rank for ZB-H1 (Qi et al., "Zero Bubble Pipeline
    Parallelism", 2024): 1F1B's order of forwards and B halves, with the W halves placed
    where 1F1B would wait.

    Rank ``r`` runs 1F1B's ``pp - r - 1`` warm-up forwards; then each steady iteration is
    F, B and, from the ``r``-th iteration on, the oldest pending W (rank ``r`` holds back
    ``r`` Ws, which fill the cool-down's gaps); each cool-down B is followed by a W; the
    held-back Ws end the step. Forwards ahead of their B stay 1F1B's ``pp - r``, and
    micro-batches between F and W (whose activations are alive) at most ``pp``, 1F1B's
    peak on rank 0. Example ``pp=2``, rank 1, ``m=3``::

        F0 B0 F1 B1 W0 F2 B2 W1 W2
    """
    m = num_microbatches
    if forward_only:
        return [Step("warmup", FORWARD, mb, 0) for mb in range(m)]
    warmup = min(pp_size - pp_rank - 1, m)
    steps = [Step("warmup", FORWARD, mb, 0) for mb in range(warmup)]
    pending: collections.deque = collections.deque()

    def backward(phase: str, mb: int, with_weight: bool) -> None:
        steps.append(Step(phase, BACKWARD_INPUT, mb, 0))
        pending.append(mb)
        if with_weight:
            steps.append(Step(phase, BACKWARD_WEIGHT, pending.popleft(), 0))

    for k in range(m - warmup):
        steps.append(Step("steady", FORWARD, warmup + k, 0))
        backward("steady", k, with_weight=k >= pp_rank)
    for mb in range(m - warmup, m):
        backward("cooldown", mb, with_weight=True)
    steps.extend(Step("cooldown", BACKWARD_WEIGHT, mb, 0) for mb in pending)
    return steps


# --------------------------------------------------------------------------------------
# Compute order: ZBV
# --------------------------------------------------------------------------------------
class _ZbvCounters:
    """Next micro-batch of each (op, chunk) on one rank, appending steps as it goes."""

    def __init__(self):
        self.steps: List[Step] = []
        self.next: Dict[Tuple[str, int], int] = collections.defaultdict(int)

    def count(self, op: str, chunk: int) -> int:
        return self.next[(op, chunk)]

    def add(self, phase: str, op: str, chunk: int) -> None:
        self.steps.append(Step(phase, op, self.next[(op, chunk)], chunk))
        self.next[(op, chunk)] += 1


def zbv_compute_order(pp_rank: int, pp_size: int, num_microbatches: int,
                      forward_only: bool = False) -> List[Step]:
    """The compute steps of one rank for ZBV (Qi et al., "Pipeline Parallelism with
    Controllable Memory", 2024; PyTorch's ``ScheduleZBVZeroBubble``).

    Chunk 0 of rank ``r`` is stage ``r``, chunk 1 is stage ``2 pp - 1 - r``
    (:class:`StageLayout` with ``v_shape``). With ``n = max(m, 2 pp - 1)`` micro-batches:

    * warm-up: ``2 (pp - r) - 1`` chunk-0 forwards; ``r`` pairs (F chunk 1, F chunk 0);
      ``pp - r`` triples (F, B, W) on chunk 1;
    * steady: (F, B, W) on chunk 0 (no F once all ``n`` are in), then on chunk 1, until
      chunk 1 has run every forward chunk 0 has;
    * cool-down: ``r`` pairs (B chunk 0, B chunk 1); ``pp - r`` pairs (B chunk 0, W chunk
      0); the remaining Ws, chunk 1 first.

    Steps of micro-batches ``>= m`` (padding when ``m < 2 pp - 1``) are then dropped on
    every rank alike. Example ``pp=2``, ``m=4``, rank 1 (``F1.0`` = F of chunk 1,
    micro-batch 0)::

        F0.0 F1.0 F0.1 F1.1 B1.0 W1.0 F0.2 B0.0 W0.0 F1.2 B1.1 W1.1
        F0.3 B0.1 W0.1 F1.3 B1.2 W1.2 B0.2 B1.3 B0.3 W0.2 W1.3 W0.3
    """
    m, pp, r = num_microbatches, pp_size, pp_rank
    if forward_only:
        # Chunk 0 for every micro-batch, then chunk 1: the V's arms one after the other.
        return [Step("warmup", FORWARD, mb, c) for c in (0, 1) for mb in range(m)]
    n = max(m, 2 * pp - 1)
    order = _ZbvCounters()
    for _ in range(2 * (pp - r) - 1):
        order.add("warmup", FORWARD, 0)
    for _ in range(r):
        order.add("warmup", FORWARD, 1)
        order.add("warmup", FORWARD, 0)
    for _ in range(pp - r):
        for op in (FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT):
            order.add("warmup", op, 1)
    _zbv_steady(order, n)
    _zbv_cooldown(order, pp, r)
    return [s for s in order.steps if s.microbatch < m]


def _zbv_steady(order: _ZbvCounters, n: int) -> None:
    while order.count(FORWARD, 1) < order.count(FORWARD, 0) or order.count(FORWARD, 0) < n:
        if order.count(FORWARD, 0) < n:
            order.add("steady", FORWARD, 0)
        order.add("steady", BACKWARD_INPUT, 0)
        order.add("steady", BACKWARD_WEIGHT, 0)
        for op in (FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT):
            order.add("steady", op, 1)


def _zbv_cooldown(order: _ZbvCounters, pp: int, r: int) -> None:
    for _ in range(r):
        order.add("cooldown", BACKWARD_INPUT, 0)
        order.add("cooldown", BACKWARD_INPUT, 1)
    for _ in range(pp - r):
        order.add("cooldown", BACKWARD_INPUT, 0)
        order.add("cooldown", BACKWARD_WEIGHT, 0)
    for chunk in (1, 0):
        while order.count(BACKWARD_WEIGHT, chunk) < order.count(BACKWARD_INPUT, chunk):
            order.add("cooldown", BACKWARD_WEIGHT, chunk)


# --------------------------------------------------------------------------------------
# Communication placement
# --------------------------------------------------------------------------------------
def _source_offset(step: Step) -> Optional[int]:
    """Where ``step``'s input comes from: the previous stage (-1) for a forward, the next
    (+1) for B or a whole backward, nowhere (None) for W."""
    if step.op == FORWARD:
        return -1
    return 1 if step.op in _GRADIENT_OPS else None


def _is_local(step: Step, pp_rank: int, layout: StageLayout, offset: int) -> bool:
    """Whether the stage ``offset`` away from ``step``'s lives on this rank too (ZBV's
    turn of the V on the last rank)."""
    return layout.neighbour(pp_rank, step.chunk, offset)[0] == pp_rank


def _has_neighbour(step: Step, pp_rank: int, layout: StageLayout, offset: int) -> bool:
    stage = layout.stage(pp_rank, step.chunk) + offset
    return 0 <= stage < layout.num_stages


def _input_recv(step: Step, pp_rank: int, layout: StageLayout) -> Optional[Step]:
    """The receive that delivers ``step``'s input (None on the pipeline's ends, for W,
    and for an input handed over on this rank)."""
    offset = _source_offset(step)
    if offset is None or not _has_neighbour(step, pp_rank, layout, offset):
        return None
    if _is_local(step, pp_rank, layout, offset):
        return None
    return Step(step.phase, RECV_FORWARD if step.op == FORWARD else RECV_BACKWARD,
                step.microbatch, step.chunk)


def _output_send(step: Step, pp_rank: int, layout: StageLayout) -> Optional[Step]:
    """The send (or, to a stage on this rank, the hand-off) that delivers ``step``'s
    output (None on the pipeline's ends and for W)."""
    offset = _source_offset(step)
    if offset is None or not _has_neighbour(step, pp_rank, layout, -offset):
        return None
    forward = step.op == FORWARD
    if _is_local(step, pp_rank, layout, -offset):
        op = HANDOFF_FORWARD if forward else HANDOFF_BACKWARD
    else:
        op = SEND_FORWARD if forward else SEND_BACKWARD
    return Step(step.phase, op, step.microbatch, step.chunk)


def _ordered(batch: List[Step]) -> List[Step]:
    return sorted(batch, key=lambda s: (COMM_OPS.index(s.op), s.chunk))


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


def _place_communication(compute: List[Step], pp_rank: int, layout: StageLayout) -> List[Step]:
    """Between two groups of compute steps one batch carries the first group's output
    sends and the second group's input receives (a W has neither, so the sends of the
    step before a W go out before it and the receives of the step after it come after).
    An output for a stage on this rank is handed over right after the step (ZBV)."""
    plan: List[Step] = []
    previous: List[Step] = []
    for current in _compute_groups(compute, layout.num_chunks) + [[]]:
        batch = [_output_send(s, pp_rank, layout) for s in previous]
        batch += [_input_recv(s, pp_rank, layout) for s in current]
        plan.extend(_ordered([s for s in batch if s is not None and s.op in COMM_OPS]))
        for step in current:
            plan.append(step)
            # A hand-off to this rank's other chunk happens at once, outside any batch.
            handoff = _output_send(step, pp_rank, layout)
            if handoff is not None and handoff.op in HANDOFF_OPS:
                plan.append(handoff)
        previous = current
    return plan


def build_plan(pp_rank: int, pp_size: int, num_microbatches: int, num_chunks: int = 1,
               group_size: Optional[int] = None, forward_only: bool = False,
               schedule: Optional[str] = None) -> List[Step]:
    """Full order of one rank: compute steps with the communication placed between them.

    ``schedule`` is a :data:`PIPELINE_SCHEDULES` value (None: 1F1B, interleaved when
    ``num_chunks > 1``). Arguments are validated with :func:`validate_schedule_args` and
    :func:`validate_pipeline_schedule` (``ValueError`` naming the flags). ``zbv`` plans
    run on :func:`stage_layout`'s V (simulate them with ``v_shape=True``).
    """
    schedule = validate_pipeline_schedule(schedule, pp_size, num_chunks)
    zero_bubble = schedule in ("zb-h1", "zbv")
    group = validate_schedule_args(pp_size, num_microbatches,
                                   None if zero_bubble else num_chunks, group_size)
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} is outside 0..{pp_size - 1}")
    layout = stage_layout(schedule, pp_size, num_chunks)
    if schedule == "zbv":
        compute = zbv_compute_order(pp_rank, pp_size, num_microbatches, forward_only)
    elif zero_bubble:
        compute = zero_bubble_compute_order(pp_rank, pp_size, num_microbatches, forward_only)
    else:
        compute = compute_order(pp_rank, pp_size, num_microbatches, num_chunks,
                                group if num_chunks > 1 else None, forward_only)
    return _place_communication(compute, pp_rank, layout)


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


def published_bubble_fraction(schedule: str, pp_size: int, num_microbatches: int) -> float:
    """The bubble fraction the papers give, for unit F = B = W (a whole backward = 2).

    1F1B (Narayanan et al. 2021): ``(p - 1) / (m + p - 1)``. ZB-H1 (Qi et al. 2024):
    bubble time ``(p - 1)(T_F + T_B - T_W)``, a third of 1F1B's ``(p - 1)(T_F + T_B + T_W)``,
    so ``(p - 1) / (3 m + p - 1)``. ZBV (Qi et al. 2024, V-ZB): 0.
    """
    p, m = pp_size, num_microbatches
    if schedule == "1f1b":
        return (p - 1) / (m + p - 1)
    if schedule == "zb-h1":
        return (p - 1) / (3 * m + p - 1)
    if schedule == "zbv":
        # "Pipeline Parallelism with Controllable Memory" (Qi et al. 2024), V-ZB: bubble
        # rate 0 for T_F = T_B = T_W, the rate as m grows (1F1B's is given as ~p/m there).
        # Timed with unit costs per chunk, the plans leave (p - 1) chunk-forwards of
        # start-up per rank: (p - 1) / (6 m + p - 1) once m >= 2 p.
        return 0.0
    raise ValueError(f"no published bubble fraction for schedule {schedule!r}")


# --------------------------------------------------------------------------------------
# Simulator
# --------------------------------------------------------------------------------------
def _message(step: Step, pp_rank: int, layout: StageLayout
             ) -> Tuple[str, int, Tuple[str, int, int]]:
    """``(direction, peer, label)`` of a comm step; the label names the receiving stage.

    Sender and receiver compute the same label for the same tensor, so a mismatch means
    the two ends would pair different tensors.
    """
    virtual = layout.stage(pp_rank, step.chunk)
    if step.op == SEND_FORWARD:
        return "send", layout.place(virtual + 1)[0], ("activation", step.microbatch, virtual + 1)
    if step.op == RECV_FORWARD:
        return "recv", layout.place(virtual - 1)[0], ("activation", step.microbatch, virtual)
    if step.op == SEND_BACKWARD:
        return "send", layout.place(virtual - 1)[0], ("gradient", step.microbatch, virtual - 1)
    return "recv", layout.place(virtual + 1)[0], ("gradient", step.microbatch, virtual)


class _Link:
    """Messages on one directed link, matched first-posted to first-posted; each entry
    is ``(label, time posted)``."""

    def __init__(self):
        self.sends: List[Tuple[Tuple[str, int, int], float]] = []
        self.recvs: List[Tuple[Tuple[str, int, int], float]] = []

    def matched(self, index: int) -> bool:
        return index < len(self.sends) and index < len(self.recvs)


class _Clock:
    """Per-rank time and busy time when :func:`simulate` is given costs."""

    def __init__(self, pp: int, costs: Optional[Dict[str, float]]):
        self.costs = costs
        self.now = [0.0] * pp
        self.busy = [0.0] * pp

    def compute(self, rank: int, op: str) -> None:
        if self.costs is not None and op not in HANDOFF_OPS:   # a hand-off is free
            cost = self.costs[op]
            self.now[rank] += cost
            self.busy[rank] += cost


def simulate(plans: Sequence[Sequence[Step]], num_chunks: int = 1, *, eager_sends: bool = False,
             costs: Optional[Dict[str, float]] = None, v_shape: bool = False,
             match_by_kind: bool = False, deferred_sends: bool = False
             ) -> Dict[str, float]:
    """Run every rank's plan together; raise :class:`ScheduleError` unless it is sound.

    Model (the strictest realistic one, NCCL-like): a rank posts all operations of its
    current batch at once and moves on only when every one of them has met its partner;
    a send completes only when the matching receive is posted (no buffering). Messages on
    each directed link pair up in posting order, and the sender's and receiver's labels
    must agree. Also checks that each ``(microbatch, chunk)`` runs forward once, its
    backward (or B) after its forward, and its W after its B. ``v_shape`` places the
    stages as ZBV does (:class:`StageLayout`); an input that comes from a stage on the
    same rank must have been handed over (``handoff_*``) before the step that uses it.

    ``deferred_sends`` (the ZBV runtime): as ``eager_sends``, but a batch waits only for
    its receives; every send is waited for at the end of the plan (a send is a posted
    ``isend`` that completes whenever its receiver gets to it).

    ``match_by_kind`` pairs activations and gradients on one link separately, as tagged
    p2p does on gloo (ZBV needs it: on link ``r -> r+1`` chunk 0's activations and chunk
    1's gradients are sent and received in different orders). Without it the messages
    of one link pair in posting order whatever their kind, as NCCL does.

    ``eager_sends`` (the zero-bubble runtime): a batch waits for its receives and for the
    sends of the rank's previous batch, not for its own sends (they complete while the
    rank computes; stream order on NCCL makes the next batch wait for them); the end of
    the plan waits for the last sends.

    ``costs`` (seconds per compute op, e.g. ``{"forward": 1, "backward": 2, ...}``) also
    times the plans: communication is free but a batch ends only when its last partner
    has posted, so waiting shows up as bubble.

    Returns:
        ``{"rounds", "batches"}`` (progress counts), plus with ``costs``: ``"makespan"``
        and ``"bubble_fraction"`` = ``1 - busy / (pp * makespan)``.
    """
    pp = len(plans)
    layout = StageLayout(pp, num_chunks, v_shape)
    eager_sends = eager_sends or deferred_sends
    programs = [group_batches(plan) + ([()] if eager_sends else []) for plan in plans]
    links: Dict[Tuple[int, int], _Link] = collections.defaultdict(_Link)
    position = [0] * pp
    clock = _Clock(pp, costs)
    comm = _Posting(pp, eager_sends, match_by_kind, deferred_sends)
    done: set = set()
    rounds = batches = 0
    while any(position[r] < len(programs[r]) for r in range(pp)):
        rounds += 1
        progressed = False
        for r in range(pp):
            while position[r] < len(programs[r]):
                item = programs[r][position[r]]
                if isinstance(item, Step):
                    _record_compute(item, r, done, layout)
                    clock.compute(r, item.op)
                elif not _advance_batch(item, r, layout, links, comm, clock):
                    break
                else:
                    batches += 1
                position[r] += 1
                progressed = True
        if not progressed:
            raise ScheduleError(_deadlock_report(programs, position))
    _check_links(links)
    result: Dict[str, float] = {"rounds": rounds, "batches": batches}
    if costs is not None:
        makespan = max(clock.now)
        result["makespan"] = makespan
        result["bubble_fraction"] = 1.0 - sum(clock.busy) / (pp * makespan) if makespan else 0.0
    return result


def _record_compute(step: Step, rank: int, done: set, layout: StageLayout) -> None:
    mb, chunk = step.microbatch, step.chunk
    key = (step.op, mb, chunk, rank)
    where = f"micro-batch {mb} chunk {chunk}"
    if key in done:
        raise ScheduleError(f"rank {rank} runs {step.op} of {where} twice")
    _check_handed_over(step, rank, done, layout)
    if step.op in _GRADIENT_OPS and (FORWARD, mb, chunk, rank) not in done:
        raise ScheduleError(f"rank {rank} runs {step.op} of {where} before its forward")
    if step.op == BACKWARD_WEIGHT and (BACKWARD_INPUT, mb, chunk, rank) not in done:
        raise ScheduleError(f"rank {rank} runs backward_weight of {where} before its "
                            "backward_input")
    done.add(key)


def _check_handed_over(step: Step, rank: int, done: set, layout: StageLayout) -> None:
    """A hand-off follows its producing step; a step whose input comes from this rank's
    other chunk runs only after that input was handed over."""
    if step.op in HANDOFF_OPS:
        producer = FORWARD if step.op == HANDOFF_FORWARD else _GRADIENT_OPS
        if not any((op, step.microbatch, step.chunk, rank) in done
                   for op in ((producer,) if isinstance(producer, str) else producer)):
            raise ScheduleError(f"rank {rank} hands over {step.op} of micro-batch "
                                f"{step.microbatch} chunk {step.chunk} before computing it")
        return
    offset = _source_offset(step)
    if (offset is None or not _has_neighbour(step, rank, layout, offset)
            or not _is_local(step, rank, layout, offset)):
        return
    source_chunk = layout.neighbour(rank, step.chunk, offset)[1]
    handoff = HANDOFF_FORWARD if step.op == FORWARD else HANDOFF_BACKWARD
    if (handoff, step.microbatch, source_chunk, rank) not in done:
        raise ScheduleError(f"rank {rank} runs {step.op} of micro-batch {step.microbatch} "
                            f"chunk {step.chunk} before chunk {source_chunk} handed its "
                            "input over")


class _Posting:
    """What each rank has posted and must still see matched before it moves on."""

    def __init__(self, pp: int, eager_sends: bool, match_by_kind: bool = False,
                 deferred_sends: bool = False):
        self.eager_sends = eager_sends or deferred_sends
        self.deferred_sends = deferred_sends
        self.match_by_kind = match_by_kind
        # For a rank blocked in a batch: [(link key, index in that link's queue)].
        self.waiting: List[Optional[List[Tuple[Tuple[int, int], int]]]] = [None] * pp
        # Eager sends of each rank's previous batch, waited for by its next batch.
        self.unwaited: List[List[Tuple[Tuple[int, int], int]]] = [[] for _ in range(pp)]
        self.own_sends: List[List[Tuple[Tuple[int, int], int]]] = [[] for _ in range(pp)]


def _advance_batch(batch: Batch, rank: int, layout: StageLayout, links, comm: _Posting,
                   clock: _Clock) -> bool:
    """Post ``batch`` (once) and report whether the messages it waits for have met their
    partner (all of them; with eager sends its receives and the previous batch's sends)."""
    if comm.waiting[rank] is None:
        receives, sends = [], []
        for step in batch:
            direction, peer, label = _message(step, rank, layout)
            key = (rank, peer) if direction == "send" else (peer, rank)
            if comm.match_by_kind:
                key += (label[0],)
            queue = links[key].sends if direction == "send" else links[key].recvs
            queue.append((label, clock.now[rank]))
            index = len(queue) - 1
            link = links[key]
            if link.matched(index) and link.sends[index][0] != link.recvs[index][0]:
                raise ScheduleError(f"link {key[0]}->{key[1]} message {index}: sender sends "
                                    f"{link.sends[index][0]} but receiver expects "
                                    f"{link.recvs[index][0]}")
            (sends if direction == "send" else receives).append((key, index))
        if comm.deferred_sends:
            # Sends are waited for only at the end of the plan (the empty last batch).
            comm.waiting[rank] = receives if batch else receives + comm.unwaited[rank]
            comm.own_sends[rank] = comm.unwaited[rank] + sends
        elif comm.eager_sends:
            comm.waiting[rank] = receives + comm.unwaited[rank]
            comm.own_sends[rank] = sends
        else:
            comm.waiting[rank] = receives + sends
    entries = comm.waiting[rank]
    if all(links[key].matched(index) for key, index in entries):
        # The batch ends when its last awaited message's later end was posted.
        clock.now[rank] = max([clock.now[rank]] + [
            max(links[key].sends[index][1], links[key].recvs[index][1])
            for key, index in entries])
        comm.waiting[rank] = None
        comm.unwaited[rank] = comm.own_sends[rank]
        comm.own_sends[rank] = []
        return True
    return False


def _check_links(links) -> None:
    for key, link in links.items():
        if len(link.sends) != len(link.recvs):
            raise ScheduleError(f"link {key[0]}->{key[1]}: {len(link.sends)} sends but "
                                f"{len(link.recvs)} receives")


def _deadlock_report(programs, position) -> str:
    lines = ["deadlock: no rank can make progress"]
    for r, program in enumerate(programs):
        where = program[position[r]] if position[r] < len(program) else "finished"
        lines.append(f"  rank {r} waits in {where}")
    return "\n".join(lines)
