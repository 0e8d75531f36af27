"""The run configuration: every config ``pretrain`` needs, and its JSON form.

:class:`RunConfig` holds one typed config per section of :data:`SECTIONS` (the result of
parsing flags; there is no global ``args``) and the values derived from them across
sections (data-parallel size, micro-batches per step). :func:`run_config_to_dict` is the
resolved configuration as plain data, printed at start-up and saved with checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, List, Optional

import torch

from megacore.distributed import DistributedDataParallelConfig
from megacore.model_parallel_config import DEPRECATED_HOOK_FIELDS
from megacore.optimizer import OptimizerConfig
from megacore.training.megatron_flags import SECTIONS
from megacore.training.training_config import (
    CheckpointArgs,
    CompatArgs,
    DataArgs,
    GPTModelArgs,
    LoggingArgs,
    SchedulerArgs,
    TrainingArgs,
)
from megacore.transformer import TransformerConfig

__all__ = ["RunConfig", "run_config_to_dict"]


@dataclasses.dataclass
class RunConfig:
    """Everything ``pretrain`` needs, as typed configs (the result of parsing flags)."""

    model: TransformerConfig
    gpt: GPTModelArgs
    optimizer: OptimizerConfig
    ddp: DistributedDataParallelConfig
    data: DataArgs
    training: TrainingArgs
    scheduler: SchedulerArgs
    logging: LoggingArgs
    checkpoint: CheckpointArgs
    compat: CompatArgs = dataclasses.field(default_factory=CompatArgs)
    yaml_cfg: Optional[str] = None

    @property
    def data_parallel_size(self) -> int:
        return self._dp

    _dp: int = 1
    num_microbatches: int = 1
    notes: List[str] = dataclasses.field(default_factory=list)
    """Lines ``pretrain`` prints once at start-up (settings taken from a checkpoint,
    flags with no effect on this backend)."""


def _jsonable(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if callable(value):
        return getattr(value, "__name__", repr(value))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and hasattr(value, "name"):  # enums
        return value.name
    return value


_RUNTIME_OBJECTS = frozenset(DEPRECATED_HOOK_FIELDS)
"""Callable-valued fields (the deprecated hooks of ``ModelParallelConfig``, which
``OptimizerConfig`` shares by name for ``timers``): runtime objects, never part of a run's
configuration. The training loop passes hooks as ``TrainingHooks`` and sets none of them,
so there is nothing to save."""


def run_config_to_dict(run: RunConfig) -> Dict[str, Dict[str, Any]]:
    """The resolved configuration as plain JSON-able data (printed and checkpointed)."""
    out = {}
    for name in SECTIONS:
        config = getattr(run, name)
        out[name] = {f.name: _jsonable(getattr(config, f.name))
                     for f in dataclasses.fields(config) if f.name not in _RUNTIME_OBJECTS}
    out["derived"] = {"data_parallel_size": run.data_parallel_size,
                      "num_microbatches": run.num_microbatches}
    return json.loads(json.dumps(out, default=str))
