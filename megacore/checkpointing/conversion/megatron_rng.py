"""Megatron-LM's saved RNG states restored as megacore's generators.

Megatron-LM (``megatron/training/checkpointing.py``: ``get_rng_state``) saves, per rank
file, ``rng_state``: a list with one entry per data-parallel rank (all-gathered with
``--data-parallel-random-init``, else just one entry that every dp rank uses)::

    {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
     "torch_rng_state": CPU generator, "cuda_rng_state": the GPU's generator,
     "rng_tracker_states": {"model-parallel-rng": ..., ...} (CUDA generator states)}

These map one to one onto megacore's state (``megacore.checkpointing.rng_state``):
random, numpy and the CPU generator always; the CUDA generator and the tensor-parallel
tracker streams (megacore uses Megatron's stream names) only when this process runs on
CUDA. On CPU, megacore's "device" generator is the CPU generator itself (restored from
``torch_rng_state``), and its tracker streams are CPU generator states, which Megatron's
CUDA tracker states cannot seed: they keep their values, and a log line says so.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from megacore import device
from megacore.checkpointing.errors import CheckpointError
from megacore.checkpointing.rng_state import capture_rng_state, restore_rng_state

__all__ = ["megacore_rng_state", "restore_megatron_rng"]

logger = logging.getLogger(__name__)

_KEYS = ("random_rng_state", "np_rng_state", "torch_rng_state")


def megacore_rng_state(entry: Dict[str, Any], on_cuda: bool, where: str) -> Dict[str, Any]:
    """megacore's RNG state from one Megatron entry; the CUDA parts are taken only when
    ``on_cuda`` (else the device generator is the CPU one and the current tracker states
    are kept)."""
    missing = [k for k in _KEYS if k not in entry]
    if missing:
        raise CheckpointError(f"{where}: the Megatron RNG state lacks {missing}; pass "
                              "--no-load-rng")
    current = capture_rng_state()
    name, key, pos, has_gauss, cached = entry["np_rng_state"]
    version, internal, gauss = entry["random_rng_state"]
    state = {"random": (version, tuple(internal), gauss),
             "numpy": [name, torch.from_numpy(np.asarray(key).astype(np.int64)), int(pos),
                       int(has_gauss), float(cached)],
             "torch": entry["torch_rng_state"],
             "device": entry["torch_rng_state"], "tracker": current["tracker"]}
    cuda = entry.get("cuda_rng_state")
    if on_cuda and not (torch.is_tensor(cuda) and cuda.numel()):
        raise CheckpointError(f"{where}: the Megatron RNG state has no CUDA generator state "
                              "(saved on CPU?); pass --no-load-rng")
    if on_cuda:
        state["device"] = cuda
        # Only the streams this process tracks, and only plain generator states (not the
        # cudagraph-safe tracker's objects): the rest keep their current values.
        saved = entry.get("rng_tracker_states") or {}
        state["tracker"] = {name: (saved[name] if torch.is_tensor(saved.get(name)) else value)
                            for name, value in current["tracker"].items()}
    return state


def restore_megatron_rng(rng: Optional[List[Dict[str, Any]]], dp_rank: int,
                         where: str) -> None:
    """Restore this data-parallel rank's entry of a Megatron ``rng_state`` list (entry 0
    when the list has one; with fewer entries than dp ranks, entry 0 and a warning)."""
    if not rng:
        raise CheckpointError(f"{where} holds no RNG state; pass --no-load-rng")
    index = dp_rank
    if index >= len(rng):
        if len(rng) > 1:
            logger.warning("%s: Megatron RNG states saved for %d data-parallel ranks, this "
                           "is dp rank %d: using dp rank 0's", where, len(rng), dp_rank)
        index = 0
    on_cuda = device.device_type() == "cuda"
    restore_rng_state(megacore_rng_state(rng[index], on_cuda, where))
    if on_cuda:
        logger.info("%s: restored Megatron's random, numpy, CPU, CUDA and tracker RNG states",
                    where)
    else:
        logger.info("%s: restored Megatron's random, numpy and CPU RNG states; its CUDA and "
                    "tracker states are not restored on CPU", where)
