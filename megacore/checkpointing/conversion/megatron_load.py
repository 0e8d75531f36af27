"""Load a Megatron-LM checkpoint straight into megacore model chunks, in any layout.

What ``examples/pretrain_gpt.py --load`` and ``tools/run_text_generation_server.py --load``
do when ``--load`` holds a Megatron-LM checkpoint (:func:`is_megatron_checkpoint`): no
conversion on disk. Each rank opens the checkpoint through the converter's loader
(``megatron_format``: legacy or torch_dist, local or Transformer Engine names, any saved
tp/pp/vpp/ep), takes the canonical tensors its own params need, and cuts its shards
exactly as a megacore torch_dist load does (``sharded_state``): the converter's
canonical names are the torch_dist keys. Every rank reads the canonical tensors it
needs whole (memory: up to one model copy per rank, as for torch_dist loads).

:func:`megatron_run_config` gives the run configuration (``model``, ``gpt`` and ``data``
sections) read from the stored ``args``, so ``--load`` alone rebuilds the model.

Unless ``no_load_optim`` or ``finetune``: Megatron's optimizer state (non-distributed
optimizer, either layout; ``megatron_optimizer`` maps it by name) fills the optimizer
exactly as a megacore torch_dist load does (moments and fp32 main params cut to this
rank's shards, param-group hyper-parameters matched by signature), and the scheduler
takes Megatron's ``opt_param_scheduler`` (the same fields). Unless ``no_load_rng``: the
RNG states of this rank's (tp, pp, ep) file, or its (pp, tp) shard of torch_dist's
``rng_state``, and dp rank are restored (``megatron_rng``)
when the run has Megatron's layout; in another layout they belong to other ranks and are
skipped with a warning, as for megacore's own torch_dist checkpoints.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from megacore.checkpointing import sharded_state as ss
from megacore.checkpointing.conversion.megatron_format import (
    is_megatron_checkpoint,
    open_megatron_source,
)
from megacore.checkpointing.conversion.megatron_rng import restore_megatron_rng
from megacore.checkpointing.conversion.tensor_rules import model_key, optimizer_key
from megacore.checkpointing.dist_checkpoint import _apply_optimizer_common
from megacore.checkpointing.errors import CheckpointError
from megacore.checkpointing.paths import legacy_file_path
from megacore.checkpointing.parallel_layout import RankLayout, current_rank_layout

__all__ = ["load_megatron_checkpoint", "megatron_run_config", "is_megatron_checkpoint"]

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^(.*)/block(\d+)$")


def megatron_run_config(load_dir: str) -> Dict[str, Any]:
    """The megacore run configuration (``model``, ``gpt``, ``data``, ``conversion``
    sections) of the Megatron checkpoint under ``load_dir``."""
    source = open_megatron_source(load_dir)
    try:
        return source.description.to_config_dict(source.layout.config_fields())
    finally:
        source.close()


def _canonical_key(key: str) -> Tuple[str, Optional[int]]:
    """``(canonical key, block)`` of a checkpoint key (``model/<name>[/block<j>]``)."""
    match = _BLOCK.match(key)
    return (match.group(1), int(match.group(2))) if match else (key, None)


def _full_tensors(source, entries: List[ss.TensorEntry], where: str, whole_model: bool,
                  known: Optional[set] = None) -> Dict[str, torch.Tensor]:
    """The global tensors the entries read, built from the source's canonical tensors
    (``whole_model``: these entries are the whole model, so every checkpoint tensor must
    be used; ``known``: the source keys they may read, default its model tensors)."""
    wanted: Dict[str, List[Tuple[str, Optional[int], ss.TensorEntry]]] = {}
    for entry in entries:
        for key in ss.source_keys(entry):
            base, block = _canonical_key(key)
            wanted.setdefault(base, []).append((key, block, entry))
    if known is None:
        known = {model_key(n) for n in source.model_names()}
    missing = sorted(set(wanted) - known)
    if missing:
        raise CheckpointError(f"{where}: the model needs tensors the Megatron checkpoint "
                              f"does not have, e.g. {missing[:5]}")
    unused = sorted(known - set(wanted))
    if unused and whole_model:
        raise CheckpointError(f"{where}: the Megatron checkpoint has tensors the model does "
                              f"not, e.g. {unused[:5]}")
    canonical = source.read(sorted(wanted), consume=False)
    full = {}
    for base, uses in wanted.items():
        for key, block, entry in uses:
            tensor = canonical[base]
            if block is not None:
                tensor = tensor.chunk(entry.stride, dim=entry.tp_dim)[block].contiguous()
            full[key] = tensor.to(entry.tensor.dtype)
    return full


def _optimizer_keys(source) -> set:
    return {optimizer_key(f, n) for n in source.model_names()
            for f in source.optimizer_fields(n)}


def _add_saved_fields(template: dict, by_local, source) -> None:
    """Give each param entry of megacore's optimizer state dict every field Megatron
    saved for it (a fresh optimizer has no Adam state yet): zeros shaped like the
    param (``step``: 0-dim), filled from the checkpoint afterwards."""
    for member in template.get("optimizers", [template]):
        for name, current in member["params"].items():
            chunk, _, local = name.partition("/")
            piece = by_local[(int(chunk), local)][0]
            for field in source.optimizer_fields(piece.key[len("model/"):]):
                if field not in current:
                    shape = () if field == "step" else current["main_param"].shape
                    current[field] = ss.like_param(torch.zeros(shape), piece)


def _load_optimizer(source, optimizer, by_local, where: str) -> None:
    """Megatron's optimizer state into this rank's optimizer (module docstring)."""
    if not source.has_optimizer:
        raise CheckpointError(f"{where}: the Megatron checkpoint holds no optimizer state; "
                              "pass --no-load-optim")
    known = _optimizer_keys(source)
    template = optimizer.state_dict()
    _add_saved_fields(template, by_local, source)
    entries = ss.optimizer_tensor_entries(template, by_local)
    full = _full_tensors(source, entries, where, False, known)
    ss.fill_entries_from_full(entries, full, where)
    kinds = source.common.optimizer_common
    _apply_optimizer_common(template, [kinds[k] for k in ("dense", "expert") if k in kinds])
    optimizer.load_state_dict(template)


def _restore_rng(source, layout: RankLayout, where: str) -> None:
    """This rank's Megatron RNG states, when the run has the checkpoint's layout: from
    its rank file (legacy) or its (pp, tp) shard of ``rng_state`` (torch_dist)."""
    lay = source.layout
    if (lay.tp, lay.pp, lay.ep) != (layout.tp, layout.pp, layout.ep):
        if layout.global_rank == 0:
            logger.warning("%s: Megatron RNG states are per rank of its layout (tp=%d, pp=%d, "
                           "ep=%d), this run's differs: not restored", where, lay.tp, lay.pp,
                           lay.ep)
        return
    saved = getattr(source, "states", None)
    if saved is None:  # torch_dist
        rng = source.rng_state(layout.pp_rank, layout.tp_rank)
        restore_megatron_rng(rng, layout.dp_rank, f"{source.iter_dir} (rng_state)")
        return
    key = (layout.tp_rank, layout.pp_rank, layout.ep_rank)
    path = legacy_file_path(source.iter_dir, *key[:2], lay.pp, key[2], lay.ep)
    restore_megatron_rng(saved[key].get("rng_state"), layout.dp_rank, path)


def load_megatron_checkpoint(model_chunks, optimizer, opt_param_scheduler, *, load_dir: str,
                             no_load_optim: bool = False, no_load_rng: bool = False,
                             finetune: bool = False, pg_collection=None
                             ) -> Tuple[int, int, int, Dict[str, Any]]:
    """Load a Megatron-LM checkpoint's weights into this rank's model chunks (any layout).

    Same contract as :func:`megacore.checkpointing.load_checkpoint`: returns
    ``(iteration, consumed_train_samples, consumed_valid_samples, run configuration)``.

    Raises:
        CheckpointError: optimizer state asked for that the checkpoint lacks or megacore
            does not read (distributed-optimizer layouts and sharding types listed in
            docs/megatron_checkpoints.md),
            state for another model, or tensors the model needs are missing; the message
            names the file, flag or tensors.
    """
    chunks = ss.unwrap_model_chunks(model_chunks)
    layout = current_rank_layout(pg_collection, len(chunks))
    load_optim = optimizer is not None and not (finetune or no_load_optim)
    source = open_megatron_source(load_dir, load_optimizer=load_optim,
                                  optimizer_required=True)
    try:
        entries, by_local = ss.model_tensor_entries(chunks, layout)
        full = _full_tensors(source, entries, load_dir, not layout.is_distributed)
        ss.fill_entries_from_full(entries, full, load_dir)
        if load_optim:
            _load_optimizer(source, optimizer, by_local, load_dir)
            scheduler_state = source.common.opt_param_scheduler
            if opt_param_scheduler is not None and scheduler_state is not None:
                opt_param_scheduler.load_state_dict(scheduler_state)
        if not (finetune or no_load_rng):
            _restore_rng(source, layout, load_dir)
        config = source.description.to_config_dict(source.layout.config_fields())
        common = source.common
    finally:
        source.close()
    if not load_optim and optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()
    layout.barrier()
    if finetune:
        return 0, 0, 0, config
    return (common.iteration, common.consumed_train_samples, common.consumed_valid_samples,
            config)
