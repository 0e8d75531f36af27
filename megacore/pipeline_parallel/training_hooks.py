"""``TrainingHooks``: the callables a training loop hands a schedule for one step.

Hooks bind one model and one optimizer (``ddp.no_sync``, ``optimizer.scale_loss``), so
they are arguments of the schedule, not configuration: a config describes a model and
is saved with its checkpoints; a hook lives as long as one training run. Every schedule
takes them as ``hooks=TrainingHooks(...)``; ``megacore.distributed.build_training_hooks``
builds them for DDP and FSDP2 model chunks.

Until megacore 0.4 the same six callables may still be set on ``ModelParallelConfig``
(deprecated since 0.2.0): :func:`resolve_hooks` falls back to them, with a warning, when
a schedule is given no ``hooks``, and refuses a call that sets both.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence, Union

import torch

from megacore.deprecation import warn_deprecated
from megacore.model_parallel_config import (
    DEPRECATED_HOOK_FIELDS,
    HOOKS_DEPRECATED_SINCE,
    HOOKS_REMOVED_IN,
)

__all__ = ["TrainingHooks", "resolve_hooks"]

NoSync = Callable[[], ContextManager]
PerChunk = Union[Callable, Sequence[Callable]]


@dataclasses.dataclass(frozen=True)
class TrainingHooks:
    """What a schedule calls besides the model: gradient sync, loss scaling, timing.

    The three per-chunk hooks (``no_sync_func``, ``grad_sync_func``, ``param_sync_func``)
    are one callable covering every model chunk, or a sequence with one per chunk.
    """

    finalize_model_grads_func: Optional[Callable] = None
    """Called once after a training step's last backward with the model chunks (and the
    summed token count with per-token losses): DDP grad sync, tied embeddings."""

    grad_scale_func: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    """Scales the loss before backward (the fp16 loss scaler, ``optimizer.scale_loss``)."""

    no_sync_func: Optional[Union[NoSync, Sequence[NoSync]]] = None
    """Context manager that defers data-parallel gradient reduction: every micro-batch
    but a chunk's last runs inside it, so gradients are reduced once per step."""

    grad_sync_func: Optional[PerChunk] = None
    """Called with a chunk's parameters after its last backward to start its gradient
    reduction (overlap with the rest of the pipeline); no_sync then stays on throughout."""

    param_sync_func: Optional[PerChunk] = None
    """Called with a chunk's parameters to start the distributed optimizer's parameter
    all-gather: chunk 0 at the start of a training step, chunk c + 1 when chunk c runs
    its first forward (one chunk of look-ahead)."""

    timers: Optional[Callable] = None
    """Megatron's timer factory: ``timers(name, log_level=2)`` returns an object with
    ``start()`` and ``stop()``. Times ``forward-compute``, ``backward-compute`` and
    ``pipeline-p2p`` (each exchange between stages)."""

    def __post_init__(self):
        for name in HOOK_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):   # frozen and hashable: keep sequences as tuples
                value = tuple(value)
                object.__setattr__(self, name, value)
            items = value if isinstance(value, tuple) and name in _PER_CHUNK else (value,)
            for item in items:
                if item is not None and not callable(item):
                    raise TypeError(f"TrainingHooks.{name} must be callable "
                                    f"(or, per chunk, a sequence of callables), got {item!r}")

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """``timers(name)`` started for the block (nothing without ``timers``)."""
        if self.timers is None:
            yield
            return
        timer = self.timers(name, log_level=2)
        timer.start()
        try:
            yield
        finally:
            timer.stop()


HOOK_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingHooks))
assert sorted(HOOK_FIELDS) == sorted(DEPRECATED_HOOK_FIELDS), "the config fields it replaces"
_PER_CHUNK = ("no_sync_func", "grad_sync_func", "param_sync_func")


def _config_hooks(config: Any) -> dict:
    """The deprecated hook fields set (not None) on a model config."""
    values = {name: getattr(config, name, None) for name in HOOK_FIELDS}
    return {name: value for name, value in values.items() if value is not None}


def resolve_hooks(hooks: Optional[TrainingHooks], config: Any) -> TrainingHooks:
    """The hooks a schedule runs with: ``hooks``, else (deprecated) the config's fields.

    Raises:
        ValueError: both are set; the schedule would not know which to call.
    """
    legacy = _config_hooks(config)
    if hooks is not None:
        if not isinstance(hooks, TrainingHooks):
            raise TypeError(f"hooks must be a TrainingHooks, got {type(hooks).__name__}")
        if legacy:
            raise ValueError(f"hooks were passed to the schedule and set on the model config "
                             f"({', '.join(sorted(legacy))}); pass them only as "
                             "hooks=TrainingHooks(...) and leave the config fields None")
        return hooks
    if not legacy:
        return TrainingHooks()
    warn_deprecated(f"ModelParallelConfig hook fields ({', '.join(sorted(legacy))})",
                    since=HOOKS_DEPRECATED_SINCE, removed_in=HOOKS_REMOVED_IN,
                    alternative="the schedule's hooks=TrainingHooks(...) argument",
                    stacklevel=4)
    return TrainingHooks(**legacy)
