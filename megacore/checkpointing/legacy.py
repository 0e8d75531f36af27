"""The legacy ("torch") format: one ``torch.save`` file per model-parallel rank.

``iter_XXXXXXX/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` (names in ``paths``) holds::

    {"model" (one chunk) or "model0", "model1", ... (virtual pipeline chunks): state dicts,
     "optimizer": the optimizer's state dict (megacore optimizers give a
                  data-parallel-independent form, also for the distributed optimizer),
     "opt_param_scheduler": scheduler state,
     "rng_state": [one entry per data-parallel rank, see ``rng_state``],
     + the common entries: checkpoint_format, checkpoint_version, megacore_version,
       iteration, consumed_train_samples, consumed_valid_samples, config,
       parallel_layout, num_model_chunks, extra_state}

Only data-parallel rank 0 of each (tp, pp[, ep]) position writes (with expert parallelism:
expert-data-parallel rank 0). The format cannot reshard: loading needs the saved tp, pp,
ep and number of model chunks (data-parallel size may change). Every file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megacore import parallel_state
from megacore.checkpointing.async_save import agree_no_problem
from megacore.checkpointing.atomic import atomic_torch_save
from megacore.checkpointing.errors import CheckpointError
from megacore.checkpointing.integrity import check_digest, has_digests, torch_save_with_digest
from megacore.checkpointing.parallel_layout import RankLayout
from megacore.checkpointing.paths import LEGACY_FILENAME, legacy_file_path
from megacore.checkpointing.rng_state import capture_rng_state, restore_rng_state
from megacore.checkpointing.sharded_state import unwrap_model_chunks

__all__ = ["prepare_legacy_save", "load_legacy_checkpoint", "legacy_rank_file",
           "is_legacy_writer", "read_legacy_file", "write_legacy_file", "model_chunk_keys",
           "clone_to_cpu"]

logger = logging.getLogger(__name__)


def legacy_rank_file(iter_dir: str, layout: RankLayout) -> str:
    """This rank's file in an iteration directory."""
    return legacy_file_path(iter_dir, layout.tp_rank, layout.pp_rank, layout.pp,
                            layout.ep_rank, layout.ep)


def is_legacy_writer(layout: RankLayout) -> bool:
    """dp rank 0 (expert-dp rank 0 with expert parallelism) writes its position's file."""
    return layout.edp_rank == 0 if layout.ep > 1 else layout.dp_rank == 0


def model_chunk_keys(num_chunks: int) -> List[str]:
    """The file entries of the model chunks: ``model``, or ``model0``, ``model1``, ..."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def write_legacy_file(path: str, state: Dict[str, Any], digest: bool = True) -> None:
    """Atomically write one rank file (creating its directory), with its digest sidecar
    (``digest=False``: none, for Megatron-LM's layout). The online save and the converter
    both write through here."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (torch_save_with_digest if digest else atomic_torch_save)(state, path)


def clone_to_cpu(obj: Any) -> Any:
    """A copy of a nested state (tensors cloned to CPU) that training may not mutate."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, clone_to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_to_cpu(v) for v in obj)
    return obj


def _gather_rng(layout: RankLayout) -> List[Dict[str, Any]]:
    """Every data-parallel rank's RNG state, in dp-rank order (collective over dp)."""
    state = capture_rng_state()
    if layout.groups is None or layout.dp == 1:
        return [state]
    gathered: List[Any] = [None] * layout.dp
    dist.all_gather_object(gathered, state, group=layout.groups.dp_cp)
    return gathered


def prepare_legacy_save(iter_dir: str, layout: RankLayout, model_chunks, optimizer,
                        scheduler, common: Dict[str, Any], *, save_rng: bool,
                        copy_tensors: bool) -> Optional[Callable[[], None]]:
    """Collect this rank's state (collective: optimizer state dict, RNG gather) and return
    the function that writes its file, or None on ranks that write nothing.

    ``copy_tensors`` clones every tensor first, for a background write while training
    goes on.
    """
    chunks = unwrap_model_chunks(model_chunks)
    _refuse_v_shape("save")
    if layout.ep > 1 and layout.etp != layout.tp:
        raise CheckpointError("the legacy format needs expert_tensor_parallel_size == "
                              f"tensor_model_parallel_size with expert parallelism (got "
                              f"{layout.etp} and {layout.tp}); use ckpt_format='torch_dist'")
    opt_state = optimizer.state_dict() if optimizer is not None else None
    rng = _gather_rng(layout) if save_rng else None
    if not is_legacy_writer(layout):
        return None
    state = dict(common)
    for key, chunk in zip(model_chunk_keys(len(chunks)), chunks):
        state[key] = chunk.state_dict()
    state["optimizer"] = opt_state
    state["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["rng_state"] = rng
    if copy_tensors:
        state = clone_to_cpu(state)
    path = legacy_rank_file(iter_dir, layout)

    def write() -> None:
        write_legacy_file(path, state)

    return write


def read_legacy_file(path: str, mmap: bool = False) -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` of one rank file, with errors naming the path."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means corruption
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from exc


def _layout_key(degrees: Dict[str, Any], num_chunks: int) -> Dict[str, Any]:
    return {"tensor_model_parallel_size": degrees["tensor_model_parallel_size"],
            "pipeline_model_parallel_size": degrees["pipeline_model_parallel_size"],
            "expert_model_parallel_size": degrees["expert_model_parallel_size"],
            "model_chunks": num_chunks}


def _refuse_v_shape(action: str) -> None:
    """The legacy files key chunks by position (``model0``, ``model1``) and their readers
    and converter assume the interleaved layer order; under ZBV's V the same positions
    hold other layers, so a ZBV run would silently swap layers with an interleaved one."""
    if parallel_state.is_virtual_pipeline_v_shape():
        raise CheckpointError(f"cannot {action} a legacy ('torch') checkpoint with "
                              "--pipeline-schedule zbv: its chunks hold other layers than "
                              "the legacy layout assumes; use --ckpt-format torch_dist "
                              "(saved by global layer number, loadable in any layout)")


def _check_layout(iter_dir: str, layout: RankLayout, num_chunks: int) -> None:
    files = sorted(glob.glob(os.path.join(iter_dir, "mp_rank_*", LEGACY_FILENAME)))
    if not files:
        raise CheckpointError(f"{iter_dir}: no mp_rank_*/{LEGACY_FILENAME} files")
    sample = read_legacy_file(files[0], mmap=True)
    saved = _layout_key(sample["parallel_layout"], sample.get("num_model_chunks", 1))
    wanted = _layout_key(layout.degrees(), num_chunks)
    if saved != wanted:
        raise CheckpointError(
            f"{iter_dir} is a legacy ('torch') checkpoint saved with tp="
            f"{saved['tensor_model_parallel_size']}, pp={saved['pipeline_model_parallel_size']}"
            f", ep={saved['expert_model_parallel_size']}, {saved['model_chunks']} model "
            f"chunk(s); this run has tp={wanted['tensor_model_parallel_size']}, pp="
            f"{wanted['pipeline_model_parallel_size']}, ep={wanted['expert_model_parallel_size']}"
            f", {wanted['model_chunks']} chunk(s). The legacy format cannot reshard: load with "
            "the saved layout, save with ckpt_format='torch_dist', or convert it with "
            "tools/checkpoint/convert.py")


def _load_model(path: str, state: Dict[str, Any], chunks, strict: bool) -> None:
    for key, chunk in zip(model_chunk_keys(len(chunks)), chunks):
        if key not in state:
            raise CheckpointError(f"{path} has no {key!r} entry (entries: {sorted(state)})")
        try:
            result = chunk.load_state_dict(state[key], strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise CheckpointError(f"{path} [{key}]: {exc}") from exc
        if strict and (result.missing_keys or result.unexpected_keys):
            raise CheckpointError(
                f"{path} [{key}]: missing keys {result.missing_keys[:8]}, unexpected keys "
                f"{result.unexpected_keys[:8]} (pass strict=False to load what matches)")


def _restore_rng(path: str, rng: Optional[List[Dict[str, Any]]], layout: RankLayout) -> None:
    if not rng:
        raise CheckpointError(f"{path} holds no RNG state; pass no_load_rng=True")
    index = layout.dp_rank
    if index >= len(rng):
        logger.warning("%s: RNG states saved for %d data-parallel ranks, this is dp rank %d: "
                       "using dp rank 0's", path, len(rng), index)
        index = 0
    restore_rng_state(rng[index])


def load_legacy_checkpoint(iter_dir: str, layout: RankLayout, model_chunks, optimizer,
                           scheduler, *, strict: bool, load_optim: bool,
                           load_rng: bool) -> Dict[str, Any]:
    """Load this rank's file into the model (and optimizer, scheduler, RNG); returns the
    file's state (its common entries name iteration, consumed samples, config)."""
    chunks = unwrap_model_chunks(model_chunks)
    _refuse_v_shape("load")
    _check_layout(iter_dir, layout, len(chunks))  # metadata only (the first file, mmap)
    path = legacy_rank_file(iter_dir, layout)
    problem = None
    if has_digests(iter_dir):
        problem = check_digest(path)
    elif layout.global_rank == 0:
        logger.warning("%s: saved without file digests (older megacore): integrity not "
                       "checked", iter_dir)
    agree_no_problem(layout, problem)
    state = read_legacy_file(path)
    _load_model(path, state, chunks, strict)
    if load_optim and optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"{path} holds no optimizer state; pass no_load_optim=True")
        optimizer.load_state_dict(state["optimizer"])
    if load_optim and scheduler is not None and state.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng:
        _restore_rng(path, state.get("rng_state"), layout)
    return state
