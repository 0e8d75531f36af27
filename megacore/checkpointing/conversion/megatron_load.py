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

Megatron's optimizer and RNG states are not converted: loading asks for
``no_load_optim`` and ``no_load_rng`` (``--no-load-optim --no-load-rng``) or ``finetune``,
and the optimizer's main params are refreshed from the loaded weights.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from megacore.checkpointing import sharded_state as ss
from megacore.checkpointing.conversion.megatron_format import (
    is_megatron_checkpoint,
    open_megatron_source,
)
from megacore.checkpointing.conversion.tensor_rules import model_key
from megacore.checkpointing.errors import CheckpointError
from megacore.checkpointing.parallel_layout import current_rank_layout

__all__ = ["load_megatron_checkpoint", "megatron_run_config", "is_megatron_checkpoint"]

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


def _full_tensors(source, entries: List[ss.TensorEntry], where: str, whole_model: bool
                  ) -> Dict[str, torch.Tensor]:
    """The global tensors the entries read, built from the source's canonical tensors
    (``whole_model``: these entries are the whole model, so every checkpoint tensor must
    be used)."""
    wanted: Dict[str, List[Tuple[str, Optional[int], ss.TensorEntry]]] = {}
    for entry in entries:
        for key in ss.source_keys(entry):
            base, block = _canonical_key(key)
            wanted.setdefault(base, []).append((key, block, entry))
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


def load_megatron_checkpoint(model_chunks, optimizer, opt_param_scheduler, *, load_dir: str,
                             no_load_optim: bool = False, no_load_rng: bool = False,
                             finetune: bool = False, pg_collection=None
                             ) -> Tuple[int, int, int, Dict[str, Any]]:
    """Load a Megatron-LM checkpoint's weights into this rank's model chunks (any layout).

    Same contract as :func:`megacore.checkpointing.load_checkpoint`: returns
    ``(iteration, consumed_train_samples, consumed_valid_samples, run configuration)``.

    Raises:
        CheckpointError: optimizer/RNG state asked for (Megatron's are not converted), or
            tensors the model needs are missing; the message names the flag or tensors.
    """
    if not finetune and not (no_load_optim and no_load_rng):
        raise CheckpointError(f"{load_dir} is a Megatron-LM checkpoint: its optimizer and RNG "
                              "states are not converted; pass --no-load-optim --no-load-rng "
                              "(or --finetune)")
    del opt_param_scheduler
    chunks = ss.unwrap_model_chunks(model_chunks)
    layout = current_rank_layout(pg_collection, len(chunks))
    source = open_megatron_source(load_dir)
    try:
        entries, _ = ss.model_tensor_entries(chunks, layout)
        full = _full_tensors(source, entries, load_dir, not layout.is_distributed)
        ss.fill_entries_from_full(entries, full, load_dir)
        config = source.description.to_config_dict(source.layout.config_fields())
        common = source.common
    finally:
        source.close()
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()
    layout.barrier()
    if finetune:
        return 0, 0, 0, config
    return (common.iteration, common.consumed_train_samples, common.consumed_valid_samples,
            config)
