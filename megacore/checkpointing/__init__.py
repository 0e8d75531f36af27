"""Checkpointing: legacy per-rank files and a layout-independent distributed format.

* :func:`save_checkpoint` / :func:`load_checkpoint`: Megatron's entry points with explicit
  arguments (``save_load``), crash-safe (atomic files, tracker written last) and optionally
  asynchronous (:func:`finalize_async_saves`).
* ``"torch"`` format (``legacy``): ``iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt``.
* ``"torch_dist"`` format (``dist_checkpoint``, ``sharded_state``): DCP with global keys,
  loadable into any tp/pp/vpp/dp layout.
* :func:`read_checkpoint_info` / :func:`verify_checkpoint`: inspection without a model.
"""

from megacore.checkpointing.async_save import (
    AsyncSaveHandle,
    finalize_async_saves,
    has_pending_async_save,
)
from megacore.checkpointing.checkpoint_info import (
    CheckpointInfo,
    format_checkpoint_info,
    read_checkpoint_info,
    verify_checkpoint,
)
from megacore.checkpointing.errors import CheckpointError
from megacore.checkpointing.paths import (
    TRACKER_FILENAME,
    iteration_dir,
    read_tracker,
    resolve_checkpoint_dir,
)
from megacore.checkpointing.save_load import (
    CHECKPOINT_VERSION,
    CKPT_FORMATS,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "finalize_async_saves",
    "has_pending_async_save",
    "AsyncSaveHandle",
    "read_checkpoint_info",
    "verify_checkpoint",
    "format_checkpoint_info",
    "CheckpointInfo",
    "CheckpointError",
    "CHECKPOINT_VERSION",
    "CKPT_FORMATS",
    "TRACKER_FILENAME",
    "iteration_dir",
    "read_tracker",
    "resolve_checkpoint_dir",
]
