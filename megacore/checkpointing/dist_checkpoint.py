"""The distributed ("torch_dist") format: layout-independent tensors on
``torch.distributed.checkpoint`` (DCP), loadable into any tp/pp/vpp/dp layout.

Files of one iteration directory::

    .metadata, __<rank>_0.distcp   DCP: every model and optimizer tensor under a global
                                   key (``sharded_state``), each rank writing its shards
    common.pt                      rank 0: iteration, consumed samples, config, layout,
                                   versions, scheduler state, optimizer hyper-parameters
                                   and loss scaler (``torch.load(weights_only=True)``)
    rng/rank_<global rank>.pt      each rank's generator states and its coordinates

RNG states belong to a rank of one layout: they are restored only when the loading
layout equals the saved one (otherwise a warning says they were skipped).

Saving is collective over all ranks (``optimizer.state_dict()`` may gather over dp, DCP
plans over the world); so is loading.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megacore.checkpointing import sharded_state as ss
from megacore.checkpointing.async_save import agree_no_problem, agree_success
from megacore.checkpointing.errors import CheckpointError
from megacore.checkpointing.integrity import (
    check_digests,
    has_digests,
    record_dcp_digests,
    torch_save_with_digest,
)
from megacore.checkpointing.parallel_layout import RankLayout
from megacore.checkpointing.paths import (
    COMMON_FILENAME,
    DCP_METADATA_FILENAME,
    rng_file_path,
)
from megacore.checkpointing.rng_state import capture_rng_state, restore_rng_state
from megacore.checkpointing.safe_dcp import read_dcp_metadata_file, safe_dcp_load

__all__ = ["save_dist_checkpoint", "load_dist_checkpoint", "read_dcp_metadata",
           "read_common", "write_common", "write_dcp_tensors", "list_tensors",
           "verify_dcp_files", "read_full_tensors"]

logger = logging.getLogger(__name__)


def read_common(iter_dir: str) -> Dict[str, Any]:
    """``common.pt`` of a distributed checkpoint (weights_only load)."""
    path = os.path.join(iter_dir, COMMON_FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: not a complete torch_dist checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means corruption
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from exc


def read_dcp_metadata(iter_dir: str):
    """DCP ``Metadata`` of an iteration directory (``state_dict_metadata``: key -> meta),
    read with the restricted unpickler of ``safe_dcp`` (never DCP's ``pickle.load``)."""
    path = os.path.join(iter_dir, DCP_METADATA_FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{iter_dir}: {DCP_METADATA_FILENAME} is missing (the save did "
                              "not finish, or this is not a torch_dist checkpoint)")
    return read_dcp_metadata_file(path)


# -- optimizer common part ---------------------------------------------------------------
def _members(opt_state: dict) -> List[dict]:
    return opt_state["optimizers"] if "optimizers" in opt_state else [opt_state]


# Param groups are told apart by what the optimizer factory groups on; their order and
# number differ between pipeline stages (a stage may lack no-weight-decay params), so
# groups are stored once per signature, gathered from all ranks, and matched on load.
_GROUP_SIGNATURE_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _group_signature(group: Dict[str, Any]) -> str:
    return repr(tuple((k, group[k]) for k in _GROUP_SIGNATURE_KEYS if k in group))


def _optimizer_common(opt_state: dict, layout: RankLayout) -> List[Dict[str, Any]]:
    """Per member: the param groups of every rank by signature, and the loss scaler."""
    mine = [{"param_groups": {_group_signature(g): g for g in m.get("param_groups") or []},
             "grad_scaler": m.get("grad_scaler")} for m in _members(opt_state)]
    if not layout.is_distributed or layout.world_size == 1:
        return mine
    gathered: List[Any] = [None] * layout.world_size
    dist.all_gather_object(gathered, mine)
    merged = gathered[0]
    for other in gathered[1:]:
        for member, theirs in zip(merged, other):
            for sig, group in theirs["param_groups"].items():
                member["param_groups"].setdefault(sig, group)
    return merged


# -- save ------------------------------------------------------------------------------
def write_common(iter_dir: str, common: Dict[str, Any]) -> None:
    """``common.pt`` with its digest (rank 0 of a save, and the converter)."""
    torch_save_with_digest(common, os.path.join(iter_dir, COMMON_FILENAME))


def write_dcp_tensors(state: Dict[str, torch.Tensor], iter_dir: str, *, no_dist: bool,
                      process_group: Optional[dist.ProcessGroup] = None) -> None:
    """DCP's data files and ``.metadata`` of ``state`` (collective unless ``no_dist``);
    their digests follow with ``integrity.record_dcp_digests``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=iter_dir, process_group=process_group, no_dist=no_dist)


def save_dist_checkpoint(iter_dir: str, layout: RankLayout, model_chunks, optimizer,
                         common: Dict[str, Any], *, save_rng: bool,
                         async_group: Optional[dist.ProcessGroup] = None):
    """Write one iteration directory. Synchronous, writes everything but the digests of
    the DCP files and returns the local function that records them; with ``async_group``
    (a group of its own, so background collectives never interleave with training's)
    the small files are written now and the returned function writes the tensors and
    their digests (run it in a background thread)."""
    entries, by_local = ss.model_tensor_entries(model_chunks, layout)
    common = dict(common)
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        entries += ss.optimizer_tensor_entries(opt_state, by_local)
        common["optimizer"] = _optimizer_common(opt_state, layout)
    state = ss.entries_to_dcp_state_dict(entries)
    error = None
    try:
        _write_small_files(iter_dir, layout, common, save_rng)
    except Exception as exc:  # noqa: BLE001 - raised on every rank below
        error = exc
    # Agree before DCP's collectives: a lone failure would leave the others waiting there.
    if not agree_success(layout, error is None):
        raise CheckpointError(f"saving {iter_dir} failed on at least one rank; the previous "
                              f"checkpoint remains the latest ({error!r} here)") from error
    no_dist = not layout.is_distributed
    rank = 0 if no_dist else layout.global_rank
    if async_group is None:
        write_dcp_tensors(state, iter_dir, no_dist=no_dist)
        # Local: the caller agrees over all ranks that it succeeded before the tracker.
        return lambda: record_dcp_digests(iter_dir, rank, coordinator=rank == 0)
    # Own staging instead of dcp.async_save: its stager fails on the param views DTensors
    # wrap ("invalid python storage", torch 2.13). Clones keep training free to step.
    staged = {k: v.detach().clone() for k, v in state.items()}

    def write() -> None:
        write_dcp_tensors(staged, iter_dir, no_dist=no_dist, process_group=async_group)
        record_dcp_digests(iter_dir, rank, coordinator=rank == 0)

    return write


def _write_small_files(iter_dir: str, layout: RankLayout, common: Dict[str, Any],
                       save_rng: bool) -> None:
    os.makedirs(os.path.dirname(rng_file_path(iter_dir, 0)), exist_ok=True)
    if save_rng:
        torch_save_with_digest({"layout": layout.degrees(), "global_rank": layout.global_rank,
                           "rng_state": capture_rng_state()},
                          rng_file_path(iter_dir, layout.global_rank))
    if layout.global_rank == 0:
        write_common(iter_dir, common)


# -- load ------------------------------------------------------------------------------
def _unexpected_model_keys(layout, entries, saved) -> List[str]:
    needed = {k for e in entries for k in ss.source_keys(e)}
    if layout.is_distributed and layout.world_size > 1:
        gathered: List[Any] = [None] * layout.world_size
        dist.all_gather_object(gathered, sorted(needed))
        needed = {k for keys in gathered for k in keys}
    return sorted(k for k in saved if k.startswith("model/") and k not in needed)


def _saved_fields(saved: Dict[str, Any]) -> List[str]:
    return sorted({k.split("/")[1] for k in saved if k.startswith("optimizer/")})


def _optimizer_entries(template: dict, by_local, saved) -> List[ss.TensorEntry]:
    """Entries for the optimizer template, adding saved fields it lacks (no step yet)."""
    fields = _saved_fields(saved)
    for member in _members(template):
        for name, current in member["params"].items():
            chunk, _, local = name.partition("/")
            param = by_local[(int(chunk), local)][0]
            global_name = param.key[len("model/"):len(param.key) - len(param.key_suffix)]
            for field in fields:
                key = ss.optimizer_key(field, global_name)
                meta = next((saved[k] for k in (key, key + param.key_suffix,
                                                ss.block_key(key + param.key_suffix, 0))
                             if k in saved), None)
                if field in current or meta is None:
                    continue
                like = current.get("main_param", param.tensor)  # the whole param's shape
                shape = tuple(like.shape) if len(meta.size) else ()
                current[field] = ss.like_param(torch.zeros(shape, dtype=meta.properties.dtype),
                                               param)
    return ss.optimizer_tensor_entries(template, by_local)


def _apply_optimizer_common(template: dict, saved_common: Optional[List[dict]]) -> None:
    members = _members(template)
    if not saved_common or len(saved_common) != len(members):
        logger.warning("checkpoint optimizer hyper-parameters do not match this optimizer's "
                       "structure; keeping the current ones (the scheduler sets lr/wd)")
        return
    for member, saved in zip(members, saved_common):
        by_signature = saved["param_groups"] or {}
        groups = []
        for group in member["param_groups"]:
            match = by_signature.get(_group_signature(group))
            if match is None:
                logger.warning("no saved param group matches %s; keeping its current "
                               "hyper-parameters", _group_signature(group))
            groups.append(group if match is None else match)
        member["param_groups"] = groups
        if saved["grad_scaler"] is not None:
            member["grad_scaler"] = saved["grad_scaler"]


def _check_missing(iter_dir, missing, strict) -> Optional[str]:
    if missing and strict:
        return (f"{iter_dir}: {len(missing)} model keys are missing from the checkpoint, "
                f"e.g. {missing[:5]} (pass strict=False to load the rest)")
    return None


def _integrity_problems(iter_dir: str, layout: RankLayout, load_rng: bool) -> Optional[str]:
    """Check the digests this rank is responsible for: the small shared files, its RNG
    file, and every ``world``-th DCP data file (so each byte is hashed once)."""
    if not has_digests(iter_dir):
        if layout.global_rank == 0:
            logger.warning("%s: saved without file digests (older megacore): integrity not "
                           "checked", iter_dir)
        return None
    paths = [os.path.join(iter_dir, DCP_METADATA_FILENAME),
             os.path.join(iter_dir, COMMON_FILENAME)]
    rng = rng_file_path(iter_dir, layout.global_rank)
    if load_rng and os.path.isfile(rng):
        paths.append(rng)
    data = sorted(f for f in os.listdir(iter_dir) if f.endswith(".distcp"))
    world = layout.world_size if layout.is_distributed else 1
    rank = layout.global_rank if layout.is_distributed else 0
    paths += [os.path.join(iter_dir, f) for f in data[rank::world]]
    return "\n".join(check_digests(paths)) or None


def load_dist_checkpoint(iter_dir: str, layout: RankLayout, model_chunks, optimizer, *,
                         strict: bool, load_optim: bool, load_rng: bool) -> Dict[str, Any]:
    """Load model (and optimizer, RNG) state into this layout; returns ``common``."""
    agree_no_problem(layout, _integrity_problems(iter_dir, layout, load_rng))
    common = read_common(iter_dir)
    saved = read_dcp_metadata(iter_dir).state_dict_metadata
    entries, by_local = ss.model_tensor_entries(model_chunks, layout)
    request, missing = ss.read_needed_keys(entries, saved)
    problem = _check_missing(iter_dir, missing, strict)
    if strict and problem is None:
        unexpected = _unexpected_model_keys(layout, entries, saved)
        if unexpected:
            problem = (f"{iter_dir}: the checkpoint has {len(unexpected)} model keys that no "
                       f"rank's model has, e.g. {unexpected[:5]} (pass strict=False to "
                       "ignore them)")
    template = None
    if problem is None and load_optim and optimizer is not None:
        template = optimizer.state_dict()
        opt_entries = _optimizer_entries(template, by_local, saved)
        opt_request, opt_missing = ss.read_needed_keys(opt_entries, saved)
        if opt_missing and (strict or not any(k.startswith("optimizer/") for k in saved)):
            problem = (f"{iter_dir}: {len(opt_missing)} optimizer keys are missing, e.g. "
                       f"{opt_missing[:5]} (pass no_load_optim=True to skip the optimizer)")
        request.update(opt_request)
        entries = entries + opt_entries
    agree_no_problem(layout, problem)
    safe_dcp_load(request, iter_dir, no_dist=not layout.is_distributed)
    ss.fill_entries_from_full(entries, request, iter_dir)
    if template is not None:
        _apply_optimizer_common(template, common.get("optimizer"))
        optimizer.load_state_dict(template)
    if load_rng:
        _load_rng(iter_dir, layout, common)
    return common


def _load_rng(iter_dir: str, layout: RankLayout, common: Dict[str, Any]) -> None:
    saved_layout = common.get("parallel_layout")
    if saved_layout != layout.degrees():
        logger.warning("%s: saved with layout %s, loading with %s: RNG states are per rank "
                       "of one layout and are not restored", iter_dir, saved_layout,
                       layout.degrees())
        return
    path = rng_file_path(iter_dir, layout.global_rank)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing (saved without RNG state?); pass "
                              "no_load_rng=True to skip it")
    restore_rng_state(torch.load(path, map_location="cpu", weights_only=True)["rng_state"])


def list_tensors(iter_dir: str) -> List[Tuple[str, Tuple[int, ...], str]]:
    """``(key, global shape, dtype)`` of every tensor, from the DCP metadata alone."""
    out = []
    for key, meta in sorted(read_dcp_metadata(iter_dir).state_dict_metadata.items()):
        if hasattr(meta, "size"):
            out.append((key, tuple(meta.size), str(meta.properties.dtype).replace("torch.",
                                                                                  "")))
    return out



def verify_dcp_files(iter_dir: str) -> List[str]:
    """Problems with the DCP data files: each referenced file exists and is long enough."""
    md = read_dcp_metadata(iter_dir)
    problems, needed = [], {}
    for info in (md.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        path = os.path.join(iter_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
        elif os.path.getsize(path) < end:
            problems.append(f"{path}: truncated ({os.path.getsize(path)} < {end} bytes)")
    return problems



def read_full_tensors(iter_dir: str, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Read whole tensors by key in this process (no process group needed)."""
    saved = read_dcp_metadata(iter_dir).state_dict_metadata
    request = {k: torch.empty(tuple(saved[k].size), dtype=saved[k].properties.dtype)
               for k in keys}
    safe_dcp_load(request, iter_dir, no_dist=True, quiet_single_process=True)
    return request

