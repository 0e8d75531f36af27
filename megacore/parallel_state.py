"""Process-group state for tensor, context, expert, data and pipeline parallelism.

This is the only module in megacore with module-level state: the default
:class:`ProcessGroupCollection` created by :func:`initialize_model_parallel` and the
virtual pipeline rank. Everything else takes groups as (optional) explicit arguments and
falls back to the getters here, so code written against ``megatron.core.parallel_state``
ports by changing the import.

Rank layout
-----------
Ranks are laid out by an order string, default ``"tp-cp-ep-dp-pp"``, the first axis
varying fastest. Dense layers see the world as ``tp * cp * dp * pp``; expert layers
re-slice the same ranks as ``expert_tp * ep * expert_dp * pp``. The layout is a pure
function (:class:`~megacore.parallel_layout.ParallelLayout`, re-exported here), tested
without processes; this module turns one into process groups.

Worked example: 8 ranks, tp=2, pp=2 (so dp=2), order ``tp-cp-ep-dp-pp``::

    rank = tp_rank + 2 * dp_rank + 4 * pp_rank
    tensor groups    [0, 1] [2, 3] [4, 5] [6, 7]
    data groups      [0, 2] [1, 3] [4, 6] [5, 7]
    pipeline groups  [0, 4] [1, 5] [2, 6] [3, 7]
    model (tp*pp)    [0, 1, 4, 5] [2, 3, 6, 7]
    embedding        [0, 4] [1, 5] [2, 6] [3, 7]   (first and last pipeline stage)
    position-embed.  [0] [1] [2] [3]               (first pipeline stage)
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

from megacore.parallel_layout import ParallelLayout

__all__ = [
    "ParallelLayout",
    "ProcessGroupCollection",
    "initialize_model_parallel",
    "destroy_model_parallel",
    "model_parallel_is_initialized",
    "get_process_group_collection",
    "get_tensor_model_parallel_group",
    "get_pipeline_model_parallel_group",
    "get_data_parallel_group",
    "get_context_parallel_group",
    "get_model_parallel_group",
    "get_tensor_and_data_parallel_group",
    "get_tensor_and_context_parallel_group",
    "get_expert_model_parallel_group",
    "get_expert_tensor_parallel_group",
    "get_expert_tensor_and_model_parallel_group",
    "get_expert_data_parallel_group",
    "get_expert_tensor_model_pipeline_parallel_group",
    "get_embedding_group",
    "get_position_embedding_group",
    "get_tensor_model_parallel_world_size",
    "get_tensor_model_parallel_rank",
    "get_pipeline_model_parallel_world_size",
    "get_pipeline_model_parallel_rank",
    "get_data_parallel_world_size",
    "get_data_parallel_rank",
    "get_context_parallel_world_size",
    "get_context_parallel_rank",
    "get_context_parallel_global_ranks",
    "get_tensor_and_context_parallel_world_size",
    "get_tensor_and_context_parallel_rank",
    "get_expert_model_parallel_world_size",
    "get_expert_model_parallel_rank",
    "get_expert_tensor_parallel_world_size",
    "get_expert_tensor_parallel_rank",
    "get_expert_data_parallel_world_size",
    "get_expert_data_parallel_rank",
    "get_tensor_model_parallel_src_rank",
    "get_data_parallel_src_rank",
    "get_pipeline_model_parallel_first_rank",
    "get_pipeline_model_parallel_last_rank",
    "get_pipeline_model_parallel_next_rank",
    "get_pipeline_model_parallel_prev_rank",
    "is_pipeline_first_stage",
    "is_pipeline_last_stage",
    "set_virtual_pipeline_v_shape",
    "is_virtual_pipeline_v_shape",
    "is_rank_in_embedding_group",
    "is_rank_in_position_embedding_group",
    "get_virtual_pipeline_model_parallel_rank",
    "set_virtual_pipeline_model_parallel_rank",
    "get_virtual_pipeline_model_parallel_world_size",
    "set_virtual_pipeline_model_parallel_world_size",
]

@dataclasses.dataclass
class ProcessGroupCollection:
    """The process groups of one grid, as seen by this rank.

    Modules take one of these (or single groups from it) as explicit arguments, so two
    grids can coexist in one process; :func:`initialize_model_parallel` installs one as
    the default for the getters below. ``ranks[name]`` holds the global ranks of this
    rank's group ``name``.
    """

    layout: ParallelLayout
    tp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp: dist.ProcessGroup
    dp_cp: dist.ProcessGroup
    pp: dist.ProcessGroup
    mp: dist.ProcessGroup
    tp_cp: dist.ProcessGroup
    tp_dp: dist.ProcessGroup
    tp_dp_cp: dist.ProcessGroup
    ep: dist.ProcessGroup
    expt_tp: dist.ProcessGroup
    tp_ep: dist.ProcessGroup
    expt_dp: dist.ProcessGroup
    tp_ep_pp: dist.ProcessGroup
    embd: Optional[dist.ProcessGroup]
    pos_embd: Optional[dist.ProcessGroup]
    ranks: Dict[str, List[int]]
    timeout: Optional[datetime.timedelta] = None
    """The timeout every group was created with (None: torch's default); groups created
    later for the same run (e.g. the background checkpoint group) use it too."""

    def __post_init__(self):
        # A collection assembled by hand must still describe its layout truthfully: code
        # reads degrees from ``layout`` and sizes from the groups, and both must agree.
        sizes = {"tp": self.layout.tensor_model_parallel_size,
                 "pp": self.layout.pipeline_model_parallel_size,
                 "cp": self.layout.context_parallel_size,
                 "dp": self.layout.data_parallel_size,
                 "ep": self.layout.expert_model_parallel_size,
                 "expt_tp": self.layout.expert_tensor_parallel_size,
                 "expt_dp": self.layout.expert_data_parallel_size}
        wrong = [f"{name} has {len(self.ranks[name])} ranks, the layout says {size}"
                 for name, size in sizes.items()
                 if name in self.ranks and len(self.ranks[name]) != size]
        if wrong:
            raise ValueError("process groups do not match their layout: " + "; ".join(wrong))

    @classmethod
    def build(cls, layout: ParallelLayout,
              timeout: Optional[datetime.timedelta] = None) -> "ProcessGroupCollection":
        """Create every group of ``layout``; must be called by all ranks of the world.

        Identical rank lists share one group object (e.g. ``tp_dp_cp`` is ``tp_dp`` when
        cp=1), which keeps the number of communicators small.
        """
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group before building groups")
        if dist.get_world_size() != layout.world_size:
            raise ValueError(f"layout is for {layout.world_size} ranks but the world has "
                             f"{dist.get_world_size()}")
        rank = dist.get_rank()
        created: Dict[Tuple[int, ...], dist.ProcessGroup] = {}
        groups: Dict[str, Optional[dist.ProcessGroup]] = {}
        ranks: Dict[str, List[int]] = {}
        for name, family in layout.all_groups().items():
            groups[name] = None
            for group_ranks in family:
                key = tuple(group_ranks)
                if key not in created:
                    # Every rank must call new_group for every group, in the same order.
                    created[key] = dist.new_group(list(key), timeout=timeout)
                if rank in group_ranks:
                    groups[name], ranks[name] = created[key], list(group_ranks)
        return cls(layout=layout, ranks=ranks, timeout=timeout, **groups)

    def size(self, name: str) -> int:
        """World size of this rank's group ``name``."""
        return len(self.ranks[name])

    def rank(self, name: str) -> int:
        """This rank's index in its group ``name``."""
        return self.ranks[name].index(dist.get_rank())


# --------------------------------------------------------------------------------------
# Module-level default grid
# --------------------------------------------------------------------------------------
_GROUPS: Optional[ProcessGroupCollection] = None
_VIRTUAL_PIPELINE_RANK: Optional[int] = None
_VIRTUAL_PIPELINE_WORLD_SIZE: Optional[int] = None
# ZBV (--pipeline-schedule zbv): chunk 1 of rank r is virtual stage 2 pp - 1 - r, so the
# last virtual stage is rank 0's chunk 1 instead of the last rank's last chunk.
_VIRTUAL_PIPELINE_V_SHAPE = False


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    order: str = "tp-cp-ep-dp-pp",
    distributed_timeout_minutes: float = 30,
) -> ProcessGroupCollection:
    """Validate the degrees, create all groups and install them as the default grid.

    ``torch.distributed`` must already be initialized (``torchrun`` plus
    ``init_process_group``). Raises ``ValueError`` naming the flags when the degrees do not
    fit the world size, before any communication.
    """
    global _GROUPS, _VIRTUAL_PIPELINE_RANK, _VIRTUAL_PIPELINE_WORLD_SIZE
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialized before "
                           "initialize_model_parallel (e.g. init_process_group('gloo'))")
    if _GROUPS is not None:
        raise RuntimeError("model parallel is already initialized; call "
                           "destroy_model_parallel() first")
    layout = ParallelLayout(
        world_size=dist.get_world_size(),
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        order=order,
    )
    _GROUPS = ProcessGroupCollection.build(
        layout, timeout=datetime.timedelta(minutes=distributed_timeout_minutes))
    if virtual_pipeline_model_parallel_size is not None:
        _VIRTUAL_PIPELINE_RANK = 0
        _VIRTUAL_PIPELINE_WORLD_SIZE = virtual_pipeline_model_parallel_size
    return _GROUPS


def destroy_model_parallel() -> None:
    """Forget the default grid (the group objects are released with it)."""
    global _GROUPS, _VIRTUAL_PIPELINE_RANK, _VIRTUAL_PIPELINE_WORLD_SIZE
    _GROUPS = None
    _VIRTUAL_PIPELINE_RANK = None
    _VIRTUAL_PIPELINE_WORLD_SIZE = None
    set_virtual_pipeline_v_shape(False)


def model_parallel_is_initialized() -> bool:
    return _GROUPS is not None


def get_process_group_collection() -> ProcessGroupCollection:
    """The default grid installed by :func:`initialize_model_parallel`."""
    if _GROUPS is None:
        raise RuntimeError("model parallel is not initialized: call "
                           "megacore.parallel_state.initialize_model_parallel(...) first")
    return _GROUPS


def _group(name: str) -> dist.ProcessGroup:
    group = getattr(get_process_group_collection(), name)
    if group is None:
        raise RuntimeError(f"this rank is not a member of a {name} group")
    return group


# -- groups ----------------------------------------------------------------------------
def get_tensor_model_parallel_group(check_initialized: bool = True):
    return _group("tp")


def get_pipeline_model_parallel_group():
    return _group("pp")


def get_data_parallel_group(with_context_parallel: bool = False):
    return _group("dp_cp" if with_context_parallel else "dp")


def get_context_parallel_group(check_initialized: bool = True):
    return _group("cp")


def get_model_parallel_group():
    return _group("mp")


def get_tensor_and_data_parallel_group(with_context_parallel: bool = False):
    return _group("tp_dp_cp" if with_context_parallel else "tp_dp")


def get_tensor_and_context_parallel_group():
    return _group("tp_cp")


def get_expert_model_parallel_group():
    return _group("ep")


def get_expert_tensor_parallel_group():
    return _group("expt_tp")


def get_expert_tensor_and_model_parallel_group():
    return _group("tp_ep")


def get_expert_data_parallel_group():
    return _group("expt_dp")


def get_expert_tensor_model_pipeline_parallel_group():
    return _group("tp_ep_pp")


def get_embedding_group():
    return _group("embd")


def get_position_embedding_group():
    return _group("pos_embd")


# -- sizes and ranks -------------------------------------------------------------------
def _size(name: str) -> int:
    return get_process_group_collection().size(name)


def _rank(name: str) -> int:
    return get_process_group_collection().rank(name)


def get_tensor_model_parallel_world_size() -> int:
    return _size("tp")


def get_tensor_model_parallel_rank() -> int:
    return _rank("tp")


def get_pipeline_model_parallel_world_size() -> int:
    return _size("pp")


def get_pipeline_model_parallel_rank() -> int:
    return _rank("pp")


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    return _size("dp_cp" if with_context_parallel else "dp")


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    return _rank("dp_cp" if with_context_parallel else "dp")


def get_context_parallel_world_size() -> int:
    return _size("cp")


def get_context_parallel_rank() -> int:
    return _rank("cp")


def get_context_parallel_global_ranks() -> List[int]:
    return list(get_process_group_collection().ranks["cp"])


def get_tensor_and_context_parallel_world_size() -> int:
    return _size("tp_cp")


def get_tensor_and_context_parallel_rank() -> int:
    return _rank("tp_cp")


def get_expert_model_parallel_world_size() -> int:
    return _size("ep")


def get_expert_model_parallel_rank() -> int:
    return _rank("ep")


def get_expert_tensor_parallel_world_size() -> int:
    return _size("expt_tp")


def get_expert_tensor_parallel_rank() -> int:
    return _rank("expt_tp")


def get_expert_data_parallel_world_size() -> int:
    return _size("expt_dp")


def get_expert_data_parallel_rank() -> int:
    return _rank("expt_dp")


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of tp rank 0 in this rank's tensor group (broadcast source)."""
    return get_process_group_collection().ranks["tp"][0]


def get_data_parallel_src_rank(with_context_parallel: bool = False) -> int:
    return get_process_group_collection().ranks["dp_cp" if with_context_parallel else "dp"][0]


def get_pipeline_model_parallel_first_rank() -> int:
    return get_process_group_collection().ranks["pp"][0]


def get_pipeline_model_parallel_last_rank() -> int:
    return get_process_group_collection().ranks["pp"][-1]


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wraps around, as the interleaved schedule needs)."""
    ranks = get_process_group_collection().ranks["pp"]
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    ranks = get_process_group_collection().ranks["pp"]
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


# -- pipeline stage predicates and virtual pipeline ------------------------------------
def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """True on the first pipeline stage (and, unless ``ignore_virtual``, its first model chunk)."""
    if not ignore_virtual and _VIRTUAL_PIPELINE_WORLD_SIZE is not None:
        if _VIRTUAL_PIPELINE_RANK != 0:
            return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """True on the last pipeline stage (and, unless ``ignore_virtual``, its last model chunk).

    Under ZBV's V (:func:`set_virtual_pipeline_v_shape`) the last virtual stage, which
    computes the loss, is chunk 1 of pipeline rank 0: the rank this answers for.
    """
    if _VIRTUAL_PIPELINE_V_SHAPE:
        if not ignore_virtual and _VIRTUAL_PIPELINE_RANK != 1:
            return False
        return get_pipeline_model_parallel_rank() == 0
    if not ignore_virtual and _VIRTUAL_PIPELINE_WORLD_SIZE is not None:
        if _VIRTUAL_PIPELINE_RANK != _VIRTUAL_PIPELINE_WORLD_SIZE - 1:
            return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def is_rank_in_embedding_group(ignore_virtual: bool = False) -> bool:
    """True where this rank holds the word embedding or the output layer tied to it."""
    ranks = get_process_group_collection().ranks.get("embd", [])
    rank = dist.get_rank()
    if rank not in ranks:
        return False
    if ignore_virtual:
        return True
    if rank == ranks[0] and is_pipeline_first_stage(ignore_virtual=False):
        return True
    return rank == ranks[-1] and is_pipeline_last_stage(ignore_virtual=False)


def is_rank_in_position_embedding_group() -> bool:
    return dist.get_rank() in get_process_group_collection().ranks.get("pos_embd", [])


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    return _VIRTUAL_PIPELINE_RANK


def set_virtual_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    global _VIRTUAL_PIPELINE_RANK
    _VIRTUAL_PIPELINE_RANK = rank


def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    return _VIRTUAL_PIPELINE_WORLD_SIZE


def set_virtual_pipeline_model_parallel_world_size(world_size: Optional[int]) -> None:
    global _VIRTUAL_PIPELINE_WORLD_SIZE
    _VIRTUAL_PIPELINE_WORLD_SIZE = world_size


def set_virtual_pipeline_v_shape(v_shape: bool) -> None:
    """Place the two chunks of each rank in ZBV's V (``--pipeline-schedule zbv``): chunk 0
    of rank ``r`` is virtual stage ``r``, chunk 1 is ``2 pp - 1 - r``. Changes what
    :func:`is_pipeline_last_stage` answers; reset by :func:`destroy_model_parallel`."""
    global _VIRTUAL_PIPELINE_V_SHAPE
    _VIRTUAL_PIPELINE_V_SHAPE = bool(v_shape)


def is_virtual_pipeline_v_shape() -> bool:
    return _VIRTUAL_PIPELINE_V_SHAPE
