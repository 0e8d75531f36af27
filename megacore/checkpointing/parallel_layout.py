"""This process's place in the parallel grid, as checkpointing needs it.

:class:`RankLayout` bundles the degrees (tp, pp, dp, cp, ep, expert tp, vpp), this rank's
coordinates and the groups used for saving and loading. It comes from an explicit
``ProcessGroupCollection``, else from :mod:`megacore.parallel_state`'s default grid, else
(no grid, e.g. an offline converter or a single-process run) it is the trivial layout
with every degree 1, in which case ``torch.distributed`` need not be initialized.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch.distributed as dist

from megacore import parallel_state
from megacore.parallel_state import ProcessGroupCollection

__all__ = ["RankLayout", "current_rank_layout"]


@dataclasses.dataclass(frozen=True)
class RankLayout:
    """Degrees, this rank's coordinates, and groups (None in the trivial layout).

    ``dp`` counts data-parallel replicas including context parallelism (ranks holding the
    same dense params): ``dp_rank == 0`` ranks write legacy model files.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: Optional[int] = None
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0
    edp_rank: int = 0
    global_rank: int = 0
    world_size: int = 1
    groups: Optional[ProcessGroupCollection] = dataclasses.field(default=None, compare=False,
                                                                 repr=False)

    def degrees(self) -> Dict[str, Any]:
        """JSON-friendly degrees, as stored in checkpoints."""
        return {"tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp,
                "data_parallel_size": self.dp // self.cp, "context_parallel_size": self.cp,
                "expert_model_parallel_size": self.ep,
                "expert_tensor_parallel_size": self.etp,
                "virtual_pipeline_model_parallel_size": self.vpp,
                "world_size": self.world_size}

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
        return RankLayout(vpp=num_model_chunks if num_model_chunks > 1 else None)
    lay = pgs.layout
    vpp = lay.virtual_pipeline_model_parallel_size
    if vpp is None and num_model_chunks > 1:
        vpp = num_model_chunks
    return RankLayout(
        tp=pgs.size("tp"), pp=pgs.size("pp"), dp=pgs.size("dp_cp"), cp=pgs.size("cp"),
        ep=pgs.size("ep"), etp=pgs.size("expt_tp"), vpp=vpp,
        tp_rank=pgs.rank("tp"), pp_rank=pgs.rank("pp"), dp_rank=pgs.rank("dp_cp"),
        ep_rank=pgs.rank("ep"), etp_rank=pgs.rank("expt_tp"), edp_rank=pgs.rank("expt_dp"),
        global_rank=dist.get_rank(), world_size=dist.get_world_size(), groups=pgs)
