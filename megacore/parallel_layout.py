"""``ParallelLayout``: the parallel degrees of one grid, validated once, and what follows.

This is the one home of the degrees (tp, pp, vpp, cp, ep, expert tp) and of everything
derived from them: the data-parallel sizes (dense and expert), the world size, the rank
groups of every axis and the coordinates of a rank in the grid. It is pure (no processes,
no ``torch.distributed``), so it is tested exhaustively without ranks, and it sits below
everything that needs it: :mod:`megacore.parallel_state` builds its process groups from
one, checkpointing describes "this rank" as a :class:`ParallelLayout` plus a rank
(``checkpointing/parallel_layout.py``), and the converter's rank-file layout derives its
degrees from one (``checkpointing/conversion/tensor_rules.py``).

``ModelParallelConfig`` keeps its degree fields (Megatron-Core's API); where a model is
built, :func:`check_config_matches_layout` compares them with the layout of the process
groups, so a config and the groups cannot silently disagree.

Ranks are laid out by an order string, default ``"tp-cp-ep-dp-pp"``, the first axis
varying fastest. Dense layers see the world as ``tp * cp * dp * pp``; expert layers
re-slice the same ranks as ``expert_tp * ep * expert_dp * pp``.

Worked example: 8 ranks, tp=2, pp=2 (so dp=2), order ``tp-cp-ep-dp-pp``::

    rank = tp_rank + 2 * dp_rank + 4 * pp_rank
    rank 6: coordinates {tp: 0, cp: 0, ep: 0, dp: 1, pp: 1}
    tensor groups    [0, 1] [2, 3] [4, 5] [6, 7]
    data groups      [0, 2] [1, 3] [4, 6] [5, 7]
    pipeline groups  [0, 4] [1, 5] [2, 6] [3, 7]
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["ParallelLayout", "orthogonal_rank_groups", "check_config_matches_layout",
           "config_layout_mismatches", "DEGREE_FLAGS", "DEGREE_FIELDS"]

_AXES = ("tp", "cp", "ep", "dp", "pp")

DEGREE_FLAGS = {
    "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size",
    "cp": "--context-parallel-size",
    "ep": "--expert-model-parallel-size",
    "etp": "--expert-tensor-parallel-size",
    "vpp": "--num-virtual-stages-per-pipeline-rank",
}
"""Flag spelling of every degree, used in error messages so a user can find what to change."""

DEGREE_FIELDS = {
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "vpp": "virtual_pipeline_model_parallel_size",
    "cp": "context_parallel_size",
    "ep": "expert_model_parallel_size",
    "etp": "expert_tensor_parallel_size",
}
"""Field of :class:`ParallelLayout` (and of ``ModelParallelConfig``) holding each degree."""


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def orthogonal_rank_groups(sizes: Dict[str, int], order: Sequence[str],
                           axes: Sequence[str]) -> List[List[int]]:
    """All groups of ranks that vary along ``axes`` and agree on every other axis.

    ``order`` lists the axes fastest-first; the rank of coordinates ``c`` is
    ``sum(c[a] * stride[a])`` with ``stride[order[0]] = 1``. Groups are listed with the
    remaining axes' coordinates counting fastest-first, and ranks inside a group with the
    chosen axes' coordinates counting fastest-first.

    Example: sizes ``{tp: 2, dp: 2, pp: 2}``, order ``(tp, dp, pp)``, axes ``(dp,)`` gives
    ``[[0, 2], [1, 3], [4, 6], [5, 7]]``.
    """
    unknown = [a for a in axes if a not in order]
    if unknown:
        raise ValueError(f"axes {unknown} are not in the order {list(order)}")
    strides, stride = {}, 1
    for axis in order:
        strides[axis] = stride
        stride *= sizes[axis]
    chosen = [a for a in order if a in axes]
    others = [a for a in order if a not in axes]

    def coords(names: List[str]) -> List[Tuple[int, ...]]:
        # itertools.product varies the last element fastest; reverse to make names[0] fastest.
        ranges = [range(sizes[a]) for a in reversed(names)]
        return [tuple(reversed(c)) for c in itertools.product(*ranges)]

    groups = []
    for outer in coords(others):
        base = sum(c * strides[a] for a, c in zip(others, outer))
        groups.append([base + sum(c * strides[a] for a, c in zip(chosen, inner))
                       for inner in coords(chosen)])
    return groups


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """The parallel degrees of one grid, validated as a whole.

    Dense layers use ``tp * cp * dp * pp == world_size``; expert layers re-slice the same
    ranks as ``expert_tp * ep * expert_dp * pp``. ``data_parallel_size`` and
    ``expert_data_parallel_size`` are derived.
    """

    world_size: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    order: str = "tp-cp-ep-dp-pp"

    def __post_init__(self):
        if self.expert_tensor_parallel_size is None:
            object.__setattr__(self, "expert_tensor_parallel_size",
                               self.tensor_model_parallel_size)
        self._validate_degrees()
        self._validate_order()

    # -- validation -------------------------------------------------------------------
    def _validate_degrees(self):
        degrees = {"tp": self.tensor_model_parallel_size,
                   "pp": self.pipeline_model_parallel_size,
                   "cp": self.context_parallel_size,
                   "ep": self.expert_model_parallel_size,
                   "etp": self.expert_tensor_parallel_size}
        for axis, size in degrees.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{DEGREE_FLAGS[axis]} must be a positive integer, got {size!r}")
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if vpp < 1:
                raise ValueError(f"{DEGREE_FLAGS['vpp']} must be >= 1, got {vpp}")
            if vpp > 1 and self.pipeline_model_parallel_size < 2:
                raise ValueError(
                    f"virtual pipeline stages ({DEGREE_FLAGS['vpp']}={vpp}) need "
                    f"{DEGREE_FLAGS['pp']} >= 2, got {self.pipeline_model_parallel_size}")
        model = (self.tensor_model_parallel_size * self.context_parallel_size
                 * self.pipeline_model_parallel_size)
        if self.world_size % model:
            rest = self.pipeline_model_parallel_size * self.context_parallel_size
            fits = [d for d in _divisors(self.world_size) if self.world_size % (d * rest) == 0]
            raise ValueError(
                f"world size {self.world_size} is not divisible by "
                f"{DEGREE_FLAGS['tp']}={self.tensor_model_parallel_size} x "
                f"{DEGREE_FLAGS['cp']}={self.context_parallel_size} x "
                f"{DEGREE_FLAGS['pp']}={self.pipeline_model_parallel_size} (= {model}); "
                f"choose degrees whose product divides {self.world_size}, e.g. "
                f"{DEGREE_FLAGS['tp']} in {fits} with the other degrees unchanged, or run on a "
                f"multiple of {model} ranks")
        expert = self.expert_tensor_parallel_size * self.expert_model_parallel_size
        dense_ranks_per_stage = self.world_size // self.pipeline_model_parallel_size
        if dense_ranks_per_stage % expert:
            etp = self.expert_tensor_parallel_size
            fits = [d for d in _divisors(dense_ranks_per_stage)
                    if dense_ranks_per_stage % (d * etp) == 0]
            raise ValueError(
                f"{DEGREE_FLAGS['etp']}={etp} x "
                f"{DEGREE_FLAGS['ep']}={self.expert_model_parallel_size} (= {expert}) "
                f"must divide the {dense_ranks_per_stage} ranks of each "
                f"pipeline stage (world {self.world_size} / {DEGREE_FLAGS['pp']} "
                f"{self.pipeline_model_parallel_size}); choose {DEGREE_FLAGS['ep']} in {fits}")

    def _validate_order(self):
        axes = self.order.split("-")
        if sorted(axes) != sorted(_AXES):
            raise ValueError(
                f"order {self.order!r} must name each of {'-'.join(_AXES)} exactly once")
        if self.expert_model_parallel_size > 1 and abs(axes.index("ep") - axes.index("dp")) != 1:
            raise ValueError(
                f"order {self.order!r}: 'ep' must be next to 'dp' when "
                f"{DEGREE_FLAGS['ep']}={self.expert_model_parallel_size} > 1, because expert ranks "
                "are carved out of the data-parallel ranks")

    # -- construction from other spellings ---------------------------------------------
    @classmethod
    def from_degrees(cls, *, tp: int = 1, pp: int = 1, dp: int = 1, cp: int = 1, ep: int = 1,
                     etp: Optional[int] = None, vpp: Optional[int] = None,
                     order: str = "tp-cp-ep-dp-pp") -> "ParallelLayout":
        """The layout of ``tp * cp * dp * pp`` ranks (the world size follows from dp).

        Example: ``from_degrees(tp=2, pp=2, dp=2).world_size == 8``.
        """
        if not isinstance(dp, int) or dp < 1:
            raise ValueError(f"data-parallel size must be a positive integer, got {dp!r}")
        return cls(world_size=tp * cp * dp * pp, tensor_model_parallel_size=tp,
                   pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                   context_parallel_size=cp, expert_model_parallel_size=ep,
                   expert_tensor_parallel_size=etp, order=order)

    @classmethod
    def from_config(cls, config: Any, world_size: int,
                    order: str = "tp-cp-ep-dp-pp") -> "ParallelLayout":
        """The layout a ``ModelParallelConfig`` asks for on ``world_size`` ranks."""
        return cls(world_size=world_size, order=order,
                   **{field: getattr(config, field) for field in DEGREE_FIELDS.values()})

    # -- derived sizes ------------------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        """Replicas of the dense model: ``world / (tp * cp * pp)``."""
        return self.world_size // (self.tensor_model_parallel_size * self.context_parallel_size
                                   * self.pipeline_model_parallel_size)

    @property
    def expert_data_parallel_size(self) -> int:
        """Replicas of each expert: ``world / (expert_tp * ep * pp)``."""
        return self.world_size // (self.expert_tensor_parallel_size
                                   * self.expert_model_parallel_size
                                   * self.pipeline_model_parallel_size)

    @property
    def num_model_chunks(self) -> int:
        """Model chunks per pipeline rank (``vpp``, or 1 when not interleaved)."""
        return self.virtual_pipeline_model_parallel_size or 1

    def degrees(self) -> Dict[str, Any]:
        """JSON-friendly degrees, as stored in checkpoints (``parallel_layout``)."""
        return {"tensor_model_parallel_size": self.tensor_model_parallel_size,
                "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
                "data_parallel_size": self.data_parallel_size,
                "context_parallel_size": self.context_parallel_size,
                "expert_model_parallel_size": self.expert_model_parallel_size,
                "expert_tensor_parallel_size": self.expert_tensor_parallel_size,
                "virtual_pipeline_model_parallel_size":
                    self.virtual_pipeline_model_parallel_size,
                "world_size": self.world_size}

    def _sizes(self, expert: bool) -> Dict[str, int]:
        if expert:
            return {"tp": self.expert_tensor_parallel_size, "cp": 1,
                    "ep": self.expert_model_parallel_size,
                    "dp": self.expert_data_parallel_size,
                    "pp": self.pipeline_model_parallel_size}
        return {"tp": self.tensor_model_parallel_size, "cp": self.context_parallel_size,
                "ep": 1, "dp": self.data_parallel_size,
                "pp": self.pipeline_model_parallel_size}

    def rank_groups(self, token: str, expert: bool = False) -> List[List[int]]:
        """All rank groups for ``token`` (axes joined by ``-``, e.g. ``"tp-pp"``).

        ``expert=True`` uses the expert re-slicing (tp means expert-tp, dp expert-dp).
        """
        return orthogonal_rank_groups(self._sizes(expert), self.order.split("-"),
                                      token.split("-"))

    def coordinates(self, rank: int, expert: bool = False) -> Dict[str, int]:
        """``rank``'s coordinate on every axis (``expert=True``: the expert re-slicing).

        Example (8 ranks, tp=2, pp=2): ``coordinates(6) == {"tp": 0, "cp": 0, "ep": 0,
        "dp": 1, "pp": 1}``.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")
        sizes, coords = self._sizes(expert), {}
        for axis in self.order.split("-"):
            rank, coords[axis] = divmod(rank, sizes[axis])
        return coords

    def group_rank(self, rank: int, token: str, expert: bool = False) -> int:
        """``rank``'s index in its group ``token`` (as in :meth:`rank_groups`).

        The axes of ``token`` count fastest-first in ``order``: with the default order,
        ``group_rank(r, "cp-dp") == cp_rank + cp * dp_rank``.
        """
        sizes, coords = self._sizes(expert), self.coordinates(rank, expert)
        axes = token.split("-")
        index, stride = 0, 1
        for axis in self.order.split("-"):
            if axis in axes:
                index += coords[axis] * stride
                stride *= sizes[axis]
        return index

    def embedding_groups(self) -> List[List[int]]:
        """First and last rank of each pipeline group (tied word embeddings)."""
        return [sorted({g[0], g[-1]}) for g in self.rank_groups("pp")]

    def position_embedding_groups(self) -> List[List[int]]:
        """First rank of each pipeline group."""
        return [[g[0]] for g in self.rank_groups("pp")]

    def all_groups(self) -> Dict[str, List[List[int]]]:
        """Every named group family of the grid: the contract of :class:`ProcessGroupCollection`."""
        return {name: (fn() if callable(fn) else self.rank_groups(*fn))
                for name, fn in _group_families(self).items()}


def _group_families(layout: ParallelLayout):
    # name in ProcessGroupCollection -> (token, expert) or a callable giving the groups
    return {
        "tp": ("tp", False),
        "cp": ("cp", False),
        "dp": ("dp", False),
        "dp_cp": ("cp-dp", False),
        "pp": ("pp", False),
        "mp": ("tp-pp", False),
        "tp_cp": ("tp-cp", False),
        "tp_dp": ("tp-dp", False),
        "tp_dp_cp": ("tp-cp-dp", False),
        "ep": ("ep", True),
        "expt_tp": ("tp", True),
        "tp_ep": ("tp-ep", True),
        "expt_dp": ("dp", True),
        "tp_ep_pp": ("tp-ep-pp", True),
        "embd": layout.embedding_groups,
        "pos_embd": layout.position_embedding_groups,
    }


def _config_degree(config: Any, axis: str) -> Optional[int]:
    value = getattr(config, DEGREE_FIELDS[axis])
    if axis == "etp" and value is None:
        value = config.tensor_model_parallel_size  # ModelParallelConfig's default
    if axis == "vpp" and value == 1:
        value = None  # one chunk per rank is "not interleaved"
    return value


def config_layout_mismatches(config: Any, layout: ParallelLayout) -> List[str]:
    """One line per degree on which ``config`` (a ``ModelParallelConfig``) and ``layout``
    disagree, naming the flag, the config field and both values; empty when they agree.

    vpp is compared only when the layout declares it: a grid initialized without vpp
    tracks no virtual stages, and the model's chunks are then the config's alone.
    """
    lines = []
    for axis, field in DEGREE_FIELDS.items():
        wanted, actual = _config_degree(config, axis), getattr(layout, field)
        if axis == "vpp":
            if actual is None:
                continue  # the grid tracks no virtual stages
            actual = actual if actual > 1 else None
        if wanted != actual:
            lines.append(f"{DEGREE_FLAGS[axis]} (config.{field}) is {wanted} in the model "
                         f"config but {actual} in the process groups")
    return lines


def check_config_matches_layout(config: Any, layout: ParallelLayout, *,
                                where: str = "the model") -> None:
    """Raise ``ValueError`` when ``config``'s degrees differ from ``layout``'s.

    Parallel layers take their sizes from their process groups, while the config's degree
    fields also steer the model (layer split, sequence-parallel shapes): a disagreement
    would build a model whose pieces assume different layouts. Call it once, where the
    config and the groups first meet (building a model).
    """
    problems = config_layout_mismatches(config, layout)
    if problems:
        raise ValueError(
            f"{where}: the config and the process groups disagree on the parallel layout: "
            + "; ".join(problems) + ". Pass the same degrees to initialize_model_parallel "
            "(or the pg_collection) and to the config")
