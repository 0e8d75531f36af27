"""``MegatronModule``: the base of every transformer and model module.

It keeps the config, resolves the process groups once (explicit ``pg_collection`` or the
default grid of :mod:`megacore.parallel_state`), and gives pipeline stages the
``set_input_tensor`` hook the schedules call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megacore import parallel_state
from megacore.parallel_state import ProcessGroupCollection
from megacore.transformer.transformer_config import TransformerConfig

__all__ = ["MegatronModule", "resolve_pg_collection"]


def resolve_pg_collection(
        pg_collection: Optional[ProcessGroupCollection]) -> ProcessGroupCollection:
    """``pg_collection``, or the default grid when it is None (resolved at construction,
    never in ``forward``)."""
    if pg_collection is not None:
        return pg_collection
    return parallel_state.get_process_group_collection()


class MegatronModule(torch.nn.Module):
    """Base class: holds ``config``, the tensor-parallel group, size and rank, and the
    context-parallel size and rank.

    Args:
        config: the transformer config.
        pg_collection: process groups (default: the grid of ``parallel_state``).
    """

    def __init__(self, config: TransformerConfig,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__()
        self.config = config
        self.pg_collection = resolve_pg_collection(pg_collection)
        self.tp_group = self.pg_collection.tp
        self.tp_size = dist.get_world_size(self.tp_group)
        self.tp_rank = dist.get_rank(self.tp_group)
        self.cp_size = dist.get_world_size(self.pg_collection.cp)
        self.cp_rank = dist.get_rank(self.pg_collection.cp)

    def set_input_tensor(self, input_tensor: Optional[torch.Tensor]) -> None:
        """Pipeline stages other than the first receive their input here, not in forward."""
        raise NotImplementedError(f"{type(self).__name__} is not a pipeline stage module")
