"""This process's place in the parallel grid, as checkpointing needs it.

:class:`RankLayout` is a view: the grid's :class:`~megacore.parallel_layout.ParallelLayout`
(the one home of the degrees and their derivations), this process's rank in it, the
number of model chunks it holds, and the groups used for saving and loading. Every
degree and coordinate below is read from the layout, never stored twice.

It comes from an explicit ``ProcessGroupCollection``, else from
:mod:`megacore.parallel_state`'s default grid, else (no grid, e.g. an offline converter or
a single-process run) it is the trivial layout with every degree 1, in which case
``torch.distributed`` need not be initialized.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch.distributed as dist

from megacore import parallel_state
from megacore.parallel_layout import ParallelLayout
from megacore.parallel_state import ProcessGroupCollection

__all__ = ["RankLayout", "current_rank_layout"]


@dataclasses.dataclass(frozen=True)
class RankLayout:
    """A :class:`ParallelLayout` seen from one rank, with its groups (None when trivial).

    ``num_chunks`` is the number of model chunks this rank holds: it is the layout's vpp
    when the grid was initialized with one, and otherwise counts the chunks actually
    built (a run may build several chunks without declaring vpp to ``parallel_state``).

    Example: 8 ranks, tp=2, pp=2 (dp=2), rank 6: ``tp_rank 0, dp_rank 1, pp_rank 1``.
    """

    layout: ParallelLayout = dataclasses.field(
        default_factory=lambda: ParallelLayout(world_size=1))
    global_rank: int = 0
    num_chunks: int = 1
    groups: Optional[ProcessGroupCollection] = dataclasses.field(default=None, compare=False,
                                                                 repr=False)

    # -- degrees, read from the layout -------------------------------------------------
    @property
    def tp(self) -> int:
        return self.layout.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.layout.pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.layout.context_parallel_size

    @property
    def ep(self) -> int:
        return self.layout.expert_model_parallel_size

    @property
    def etp(self) -> int:
        return self.layout.expert_tensor_parallel_size

    @property
    def dp(self) -> int:
        """Data-parallel replicas *including* context parallelism (``dp * cp``): the ranks
        holding the same dense params. The checkpoint entry's ``data_parallel_size`` is the
        layout's dp without cp."""
        return self.layout.data_parallel_size * self.cp

    @property
    def vpp(self) -> Optional[int]:
        return self.layout.virtual_pipeline_model_parallel_size or (
            self.num_chunks if self.num_chunks > 1 else None)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    # -- this rank's coordinates -------------------------------------------------------
    def _index(self, token: str, expert: bool = False) -> int:
        return self.layout.group_rank(self.global_rank, token, expert)

    @property
    def tp_rank(self) -> int:
        return self._index("tp")

    @property
    def pp_rank(self) -> int:
        return self._index("pp")

    @property
    def dp_rank(self) -> int:
        """Index among the :attr:`dp` replicas (the ``dp_cp`` group): ``dp_rank == 0`` ranks
        write legacy model files."""
        return self._index("cp-dp")

    @property
    def ep_rank(self) -> int:
        return self._index("ep", expert=True)

    @property
    def etp_rank(self) -> int:
        return self._index("tp", expert=True)

    @property
    def edp_rank(self) -> int:
        return self._index("dp", expert=True)

    def degrees(self) -> Dict[str, Any]:
        """JSON-friendly degrees, as stored in checkpoints (vpp counts built chunks)."""
        return {**self.layout.degrees(), "virtual_pipeline_model_parallel_size": self.vpp}

    @property
    def is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def tp_group_for(self, expert: bool):
        """The group a tp-split param is split over (expert-tp for expert params)."""
        if self.groups is None:
            return None
        return self.groups.expt_tp if expert else self.groups.tp


def current_rank_layout(pg_collection: Optional[ProcessGroupCollection] = None,
                        num_model_chunks: int = 1) -> RankLayout:
    """The layout from ``pg_collection``, the default grid, or the trivial layout."""
    pgs = pg_collection
    if pgs is None and parallel_state.model_parallel_is_initialized():
        pgs = parallel_state.get_process_group_collection()
    if pgs is None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world != 1:
            raise RuntimeError("checkpointing on several ranks needs the parallel grid: call "
                               "megacore.parallel_state.initialize_model_parallel first or "
                               "pass pg_collection")
        return RankLayout(num_chunks=num_model_chunks)
    if pgs.layout.world_size != dist.get_world_size():
        raise RuntimeError(f"checkpointing needs the grid of the whole world: the process "
                           f"groups describe {pgs.layout.world_size} ranks, the world has "
                           f"{dist.get_world_size()}")
    return RankLayout(layout=pgs.layout, global_rank=dist.get_rank(),
                      num_chunks=num_model_chunks, groups=pgs)
