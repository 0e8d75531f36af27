"""``save_checkpoint`` / ``load_checkpoint``: Megatron's entry points, explicit arguments.

A save (collective over all ranks) writes ``{save_dir}/iter_XXXXXXX`` in the chosen
format (``"torch"``: legacy per-rank files, ``legacy.py``; ``"torch_dist"``: layout-
independent DCP, ``dist_checkpoint.py``) and then, once every rank's files are complete,
rank 0 atomically points ``latest_checkpointed_iteration.txt`` at it. Order::

    finalize the previous async save -> collect state (collectives) -> write files
    (each atomically; in the background with async_save) -> all ranks agree that every
    write succeeded -> rank 0 writes the tracker

A crash or failure anywhere before the last step leaves the previous checkpoint as the
latest loadable one. Every file gets a SHA-256 sidecar (``integrity``), checked on load;
``torch_dist`` metadata is read without unpickling arbitrary objects (``safe_dcp``).

Loading follows Megatron's flags: ``no_load_optim`` skips optimizer and scheduler state,
``no_load_rng`` the random generators, and ``finetune`` loads model weights only and
restarts counting (iteration and consumed samples 0). Whenever the optimizer state is
not loaded, the optimizer's main params are refreshed from the loaded model weights.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch

from megacore.checkpointing import async_save as async_mod
from megacore.checkpointing.dist_checkpoint import (
    load_dist_checkpoint,
    save_dist_checkpoint,
)
from megacore.checkpointing.errors import CheckpointError
from megacore.checkpointing.legacy import load_legacy_checkpoint, prepare_legacy_save
from megacore.checkpointing.parallel_layout import RankLayout, current_rank_layout
from megacore.checkpointing.paths import (
    detect_format,
    iteration_dir,
    resolve_checkpoint_dir,
    write_tracker,
)
from megacore.checkpointing.sharded_state import unwrap_model_chunks
from megacore.package_info import __version__

__all__ = ["save_checkpoint", "load_checkpoint", "common_state", "CHECKPOINT_VERSION",
           "CKPT_FORMATS"]

CHECKPOINT_VERSION = 3.0
"""Version of the file contents (Megatron's ``checkpoint_version`` is 3.0 too)."""

CKPT_FORMATS = ("torch", "torch_dist")


def common_state(*, ckpt_format: str, iteration: int, parallel_layout: Dict[str, Any],
                 num_model_chunks: int, consumed_train_samples: int,
                 consumed_valid_samples: int, config_dict: Optional[Dict[str, Any]],
                 extra_state: Any, opt_param_scheduler: Optional[Dict[str, Any]]
                 ) -> Dict[str, Any]:
    """The non-tensor entries of a checkpoint (each legacy rank file, torch_dist's
    ``common.pt``): the online save and the converter both write these."""
    return {"checkpoint_format": ckpt_format, "checkpoint_version": CHECKPOINT_VERSION,
            "megacore_version": __version__, "iteration": int(iteration),
            "consumed_train_samples": int(consumed_train_samples),
            "consumed_valid_samples": int(consumed_valid_samples),
            "config": config_dict, "parallel_layout": parallel_layout,
            "num_model_chunks": num_model_chunks, "extra_state": extra_state,
            "opt_param_scheduler": opt_param_scheduler}


def _common_state(ckpt_format: str, iteration: int, layout: RankLayout, num_chunks: int,
                  consumed_train_samples: int, consumed_valid_samples: int,
                  config_dict: Optional[Dict[str, Any]], extra_state: Any,
                  scheduler) -> Dict[str, Any]:
    try:
        json.dumps(config_dict)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"config_dict must be JSON-serializable (the resolved run "
                        f"configuration): {exc}") from exc
    return common_state(
        ckpt_format=ckpt_format, iteration=iteration, parallel_layout=layout.degrees(),
        num_model_chunks=num_chunks, consumed_train_samples=consumed_train_samples,
        consumed_valid_samples=consumed_valid_samples, config_dict=config_dict,
        extra_state=extra_state,
        opt_param_scheduler=scheduler.state_dict() if scheduler is not None else None)


def _tracker_finalizer(save_dir: str, iteration: int, layout: RankLayout):
    def finalize() -> None:
        error = None
        if layout.global_rank == 0:
            try:
                write_tracker(save_dir, iteration)
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                error = exc
        # Also the barrier after which every rank may read the tracker.
        if not async_mod.agree_success(layout, error is None):
            raise CheckpointError(f"updating the tracker in {save_dir} to iteration "
                                  f"{iteration} failed; the previous checkpoint remains the "
                                  f"latest ({error!r} on rank 0)") from error

    return finalize


def _non_finite_param(chunks, layout: RankLayout, iter_dir: str) -> Optional[str]:
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param.detach()).all()):
                where = f"chunk {index} " if len(chunks) > 1 else ""
                return (f"refusing to save {iter_dir}: parameter {where}{name!r} on rank "
                        f"{layout.global_rank} holds NaN/Inf values; nothing was written and "
                        "the previous checkpoint remains the latest")
    return None


def _run_sync(job, layout: RankLayout, iter_dir: str) -> None:
    """Run a local write; fail on every rank if it failed on any (no lone raise)."""
    error = None
    try:
        if job is not None:
            job()
    except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
        error = exc
    if not async_mod.agree_success(layout, error is None):
        raise CheckpointError(f"saving {iter_dir} failed on at least one rank; the previous "
                              f"checkpoint remains the latest ({error!r} here)") from error


def save_checkpoint(iteration: int, model_chunks, optimizer, opt_param_scheduler, *,
                    save_dir: str, ckpt_format: str = "torch", consumed_train_samples: int,
                    consumed_valid_samples: int = 0,
                    config_dict: Optional[Dict[str, Any]] = None, rng_state: bool = True,
                    async_save: bool = False, extra_state: Any = None,
                    pg_collection=None) -> str:
    """Save a checkpoint of iteration ``iteration`` (collective over all ranks).

    Args:
        iteration: the number of completed training iterations.
        model_chunks: this rank's model chunks (one per virtual pipeline stage), plain or
            DDP-wrapped (``.module`` is unwrapped); a single module is accepted.
        optimizer: a megacore optimizer (or None to save no optimizer state).
        opt_param_scheduler: learning-rate/weight-decay scheduler (or None).
        save_dir: root directory (``iter_XXXXXXX`` and the tracker go inside).
        ckpt_format: ``"torch"`` (legacy per-rank files) or ``"torch_dist"`` (DCP,
            loadable into another parallel layout).
        consumed_train_samples, consumed_valid_samples: data position to resume from.
        config_dict: the resolved run configuration (JSON-serializable), returned by
            :func:`load_checkpoint` and shown by the inspect tool.
        rng_state: save every rank's random generator states.
        async_save: write in the background; the tracker is written when a later
            :func:`finalize_async_saves` (or the next save) finds all writes complete.
        extra_state: anything else to keep (weights_only-loadable: tensors, numbers,
            strings, lists, dicts).
        pg_collection: process groups (default: ``parallel_state``'s grid).

    Returns:
        The iteration directory.

    Raises:
        CheckpointError: a model parameter holds NaN/Inf (checked on every rank before
            any file is written: the tracker never moves to non-finite weights), or a
            write failed on some rank (the previous checkpoint remains the latest).
    """
    if ckpt_format not in CKPT_FORMATS:
        raise ValueError(f"ckpt_format must be one of {CKPT_FORMATS}, got {ckpt_format!r}")
    async_mod.finalize_async_saves(blocking=True)
    chunks = unwrap_model_chunks(model_chunks)
    layout = current_rank_layout(pg_collection, len(chunks))
    iter_dir = iteration_dir(save_dir, iteration)
    common = _common_state(ckpt_format, iteration, layout, len(chunks), consumed_train_samples,
                           consumed_valid_samples, config_dict, extra_state,
                           opt_param_scheduler)
    # Before any file: a checkpoint with NaN/Inf weights would poison every resume.
    async_mod.agree_no_problem(layout, _non_finite_param(chunks, layout, iter_dir))
    finalize = _tracker_finalizer(save_dir, iteration, layout)
    handle = async_mod.AsyncSaveHandle(layout, finalize, iter_dir) if async_save else None
    if layout.global_rank == 0:
        os.makedirs(iter_dir, exist_ok=True)
    if ckpt_format == "torch":
        job = prepare_legacy_save(iter_dir, layout, chunks, optimizer, opt_param_scheduler,
                                  common, save_rng=rng_state, copy_tensors=async_save)
        if handle is not None:
            if job is not None:
                handle.add_thread_job(job)
        else:
            _run_sync(job, layout, iter_dir)
    else:
        group = async_mod.async_process_group(layout) if async_save else None
        job = save_dist_checkpoint(iter_dir, layout, chunks, optimizer, common,
                                   save_rng=rng_state, async_group=group)
        if handle is not None:
            handle.add_thread_job(job)
        else:
            _run_sync(job, layout, iter_dir)
    if handle is not None:
        async_mod.set_pending(handle)
    else:
        finalize()
    return iter_dir


def load_checkpoint(model_chunks, optimizer, opt_param_scheduler, *, load_dir: str,
                    strict: bool = True, no_load_optim: bool = False, no_load_rng: bool = False,
                    finetune: bool = False, pg_collection=None
                    ) -> Tuple[int, int, int, Optional[Dict[str, Any]]]:
    """Load the latest checkpoint under ``load_dir`` (or the iteration directory
    ``load_dir``) into the model chunks, optimizer and scheduler (collective).

    Args:
        model_chunks: as for :func:`save_checkpoint`.
        optimizer, opt_param_scheduler: filled unless ``no_load_optim``/``finetune``
            (either may be None).
        load_dir: a save directory with ``latest_checkpointed_iteration.txt`` or one
            ``iter_XXXXXXX`` directory.
        strict: every model tensor must be in the checkpoint and (torch_dist) every
            checkpoint model tensor in some rank's model.
        no_load_optim: skip optimizer and scheduler state.
        no_load_rng: skip random generator states.
        finetune: load model weights only; the returned iteration and consumed samples
            are 0.
        pg_collection: process groups (default: ``parallel_state``'s grid).

    Returns:
        ``(iteration, consumed_train_samples, consumed_valid_samples, saved config_dict)``.

    Raises:
        CheckpointError: no checkpoint, a missing or corrupt file (including one whose
            bytes differ from the SHA-256 digest recorded at save), a metadata pickle
            referencing classes outside DCP's own (``UnsafeCheckpointError``), a layout
            the legacy format cannot load, or (strict) missing/unexpected keys; the
            message names the path, and the keys or layouts.
    """
    async_mod.finalize_async_saves(blocking=True)
    chunks = unwrap_model_chunks(model_chunks)
    layout = current_rank_layout(pg_collection, len(chunks))
    iter_dir, _ = resolve_checkpoint_dir(load_dir)
    load_optim = not (finetune or no_load_optim)
    load_rng = not (finetune or no_load_rng)
    if detect_format(iter_dir) == "torch":
        common = load_legacy_checkpoint(iter_dir, layout, chunks, optimizer,
                                        opt_param_scheduler, strict=strict,
                                        load_optim=load_optim, load_rng=load_rng)
    else:
        common = load_dist_checkpoint(iter_dir, layout, chunks, optimizer, strict=strict,
                                      load_optim=load_optim, load_rng=load_rng)
        if load_optim and opt_param_scheduler is not None \
                and common.get("opt_param_scheduler") is not None:
            opt_param_scheduler.load_state_dict(common["opt_param_scheduler"])
    if optimizer is not None and not load_optim and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()
    layout.barrier()
    if finetune:
        return 0, 0, 0, common.get("config")
    return (int(common["iteration"]), int(common["consumed_train_samples"]),
            int(common["consumed_valid_samples"]), common.get("config"))
