"""Which layers each pipeline stage (and virtual stage) builds: a pure function.

Layers are dealt out in the order of *virtual stages*: chunk ``c`` of pipeline rank ``r``
is virtual stage ``v = c * pp + r``, and virtual stage ``v`` holds the layers after
those of ``v - 1``. The first and last pipeline stage may hold a different number of
layers than the middle ones (``num_layers_in_first_pipeline_stage`` /
``num_layers_in_last_pipeline_stage``, e.g. to leave room for the embedding and the
output layer); with interleaving each stage's layers are split evenly over its chunks.

Worked example: 10 layers, pp=4, first stage 1, last stage 3 -> the two middle stages get
(10 - 1 - 3) / 2 = 3 each::

    rank 0: layers 0        (offset 0, count 1)
    rank 1: layers 1-3      (offset 1, count 3)
    rank 2: layers 4-6      (offset 4, count 3)
    rank 3: layers 7-9      (offset 7, count 3)

With 8 layers, pp=2, vpp=2 (2 layers per virtual stage)::

    rank 0: chunk 0 -> layers 0-1 (v=0), chunk 1 -> layers 4-5 (v=2)
    rank 1: chunk 0 -> layers 2-3 (v=1), chunk 1 -> layers 6-7 (v=3)

ZBV (``v_shape=True``, ``--pipeline-schedule zbv``) places the virtual stages in a V:
chunk 0 of rank ``r`` is ``v = r`` and chunk 1 is ``v = 2 pp - 1 - r``, so rank 0 holds
the first layers (with the embedding) and the last ones (with the output layer and the
loss). Same 8 layers, pp=2::

    rank 0: chunk 0 -> layers 0-1 (v=0), chunk 1 -> layers 6-7 (v=3)
    rank 1: chunk 0 -> layers 2-3 (v=1), chunk 1 -> layers 4-5 (v=2)
"""

from __future__ import annotations

from typing import List, Optional, Tuple

__all__ = [
    "pipeline_layer_counts",
    "get_layer_offset_and_count",
    "virtual_stages_from_layers_per_stage",
]

_NUM_LAYERS = "--num-layers"
_FIRST = "--decoder-first-pipeline-num-layers"
_LAST = "--decoder-last-pipeline-num-layers"
_PP = "--pipeline-model-parallel-size"
_VPP = "--num-virtual-stages-per-pipeline-rank (or --num-layers-per-virtual-pipeline-stage)"


def virtual_stages_from_layers_per_stage(num_layers: int, pipeline_model_parallel_size: int,
                                         num_layers_per_virtual_pipeline_stage: int) -> int:
    """Translate ``--num-layers-per-virtual-pipeline-stage`` into chunks per rank (vpp).

    Raises:
        ValueError: when the layers of a stage do not split into whole virtual stages.
    """
    per_stage, rest = divmod(num_layers, pipeline_model_parallel_size)
    n = num_layers_per_virtual_pipeline_stage
    if rest or n < 1 or per_stage % n:
        raise ValueError(
            f"{_NUM_LAYERS}={num_layers} / {_PP}={pipeline_model_parallel_size} must be a "
            f"multiple of --num-layers-per-virtual-pipeline-stage={n}")
    return per_stage // n


def _stage_totals(num_layers: int, pp: int, first: Optional[int],
                  last: Optional[int]) -> List[int]:
    """Layers per pipeline rank (all chunks together)."""
    for flag, value in ((_FIRST, first), (_LAST, last)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{flag} must be a non-negative integer, got {value!r}")
    if (first is not None or last is not None) and pp < 2:
        raise ValueError(f"{_FIRST} / {_LAST} need {_PP} >= 2, got {pp}")
    ends = [first is not None, last is not None]
    middle_stages = pp - sum(ends)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0):
        raise ValueError(
            f"{_NUM_LAYERS}={num_layers} does not match {_FIRST}={first} and {_LAST}={last} "
            f"with {_PP}={pp}: the first and last stage would hold "
            f"{(first or 0) + (last or 0)} layers and {middle_stages} other stages "
            f"{middle_layers}")
    if middle_stages and middle_layers % middle_stages:
        what = ("the remaining layers" if any(ends) else "the layers")
        raise ValueError(
            f"{what} ({middle_layers} of {_NUM_LAYERS}={num_layers}) must divide evenly over "
            f"{middle_stages} pipeline stages ({_PP}={pp}"
            + (f", {_FIRST}={first}, {_LAST}={last}" if any(ends) else "")
            + "); set " + (f"{_FIRST} / {_LAST}" if not any(ends) else _NUM_LAYERS)
            + " to balance them")
    per_middle = middle_layers // middle_stages if middle_stages else 0
    totals = [per_middle] * pp
    if first is not None:
        totals[0] = first
    if last is not None:
        totals[-1] = last
    return totals


def pipeline_layer_counts(num_layers: int, pipeline_model_parallel_size: int,
                          virtual_pipeline_model_parallel_size: Optional[int] = None,
                          num_layers_in_first_pipeline_stage: Optional[int] = None,
                          num_layers_in_last_pipeline_stage: Optional[int] = None
                          ) -> List[List[int]]:
    """Layers of every (virtual) stage, indexed ``[chunk][pp_rank]``.

    Validates the whole split, so call it once before building a model (and before any
    communication): every rank gets the same answer or the same error.

    Raises:
        ValueError: naming the flags that do not fit together.
    """
    pp = pipeline_model_parallel_size
    vpp = virtual_pipeline_model_parallel_size or 1
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{_NUM_LAYERS} must be a positive integer, got {num_layers!r}")
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"{_PP} must be a positive integer, got {pp!r}")
    if not isinstance(vpp, int) or vpp < 1:
        raise ValueError(f"{_VPP} must be a positive integer, got {vpp!r}")
    totals = _stage_totals(num_layers, pp, num_layers_in_first_pipeline_stage,
                           num_layers_in_last_pipeline_stage)
    uneven = [(r, t) for r, t in enumerate(totals) if t % vpp]
    if uneven:
        rank, total = uneven[0]
        raise ValueError(
            f"pipeline rank {rank} holds {total} layers, which do not split into {vpp} "
            f"virtual stages ({_VPP}); adjust {_NUM_LAYERS}={num_layers}"
            + (f", {_FIRST}" if num_layers_in_first_pipeline_stage is not None else "")
            + (f", {_LAST}" if num_layers_in_last_pipeline_stage is not None else "")
            + f" or {_VPP}")
    return [[total // vpp for total in totals] for _ in range(vpp)]


def get_layer_offset_and_count(num_layers: int, pipeline_model_parallel_size: int,
                               pipeline_model_parallel_rank: int,
                               virtual_pipeline_model_parallel_size: Optional[int] = None,
                               virtual_pipeline_model_parallel_rank: Optional[int] = None,
                               num_layers_in_first_pipeline_stage: Optional[int] = None,
                               num_layers_in_last_pipeline_stage: Optional[int] = None,
                               v_shape: bool = False) -> Tuple[int, int]:
    """Global index of the first layer and number of layers of one (virtual) stage.

    Args:
        num_layers: layers of the whole model.
        pipeline_model_parallel_size: pipeline ranks (pp).
        pipeline_model_parallel_rank: this rank, ``0 <= rank < pp``.
        virtual_pipeline_model_parallel_size: chunks per rank (vpp); None means 1.
        virtual_pipeline_model_parallel_rank: this chunk; None means 0.
        num_layers_in_first_pipeline_stage: layers on rank 0 (None: even split).
        num_layers_in_last_pipeline_stage: layers on rank pp-1 (None: even split).
        v_shape: ZBV's V placement of the two chunks (see the module docstring).

    Returns:
        ``(offset, count)``: this stage builds layers ``offset .. offset + count - 1``.

    Raises:
        ValueError: naming the flags when the split is impossible.
    """
    if v_shape:
        _check_v_shape(virtual_pipeline_model_parallel_size, num_layers_in_first_pipeline_stage,
                       num_layers_in_last_pipeline_stage)
    counts = pipeline_layer_counts(num_layers, pipeline_model_parallel_size,
                                   virtual_pipeline_model_parallel_size,
                                   num_layers_in_first_pipeline_stage,
                                   num_layers_in_last_pipeline_stage)
    pp, vpp = pipeline_model_parallel_size, len(counts)
    rank, chunk = pipeline_model_parallel_rank, virtual_pipeline_model_parallel_rank or 0
    if not 0 <= rank < pp:
        raise ValueError(f"pipeline rank {rank} is outside 0..{pp - 1}")
    if not 0 <= chunk < vpp:
        raise ValueError(f"virtual pipeline rank {chunk} is outside 0..{vpp - 1}")
    flat = [n for row in counts for n in row]   # virtual stage v = chunk * pp + rank
    virtual = chunk * pp + rank
    if v_shape:
        # Every virtual stage holds the same number of layers (checked above).
        virtual = rank if chunk == 0 else 2 * pp - 1 - rank
    return sum(flat[:virtual]), flat[virtual]


def _check_v_shape(vpp: Optional[int], first: Optional[int], last: Optional[int]) -> None:
    """ZBV's V needs exactly two chunks per rank, all virtual stages of equal size."""
    if vpp != 2:
        raise ValueError(f"--pipeline-schedule zbv places exactly 2 model chunks per rank; "
                         f"{_VPP} is {vpp}")
    if first is not None or last is not None:
        raise ValueError(f"--pipeline-schedule zbv splits the layers evenly over its 2 x "
                         f"{_PP} virtual stages; drop {_FIRST} / {_LAST}")
