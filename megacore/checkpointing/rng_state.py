"""Capture and restore every random generator a training process uses, in a form that
``torch.load(weights_only=True)`` accepts.

One rank's state::

    {"random": Python ``random`` state (version, tuple of 625 ints, gauss),
     "numpy":  [name, uint32 key as an int64 tensor, pos, has_gauss, cached_gaussian],
     "torch":  CPU generator state (uint8 tensor),
     "device": accelerator generator state (``megacore.device.get_device_rng_state``),
     "tracker": {stream name: state} of the tensor-parallel RNG tracker}

The numpy key is stored as a tensor rather than an ``ndarray`` so that loading needs no
``add_safe_globals``. The key is ``uint32`` in numpy; int64 holds it exactly.
"""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

from megacore import device
from megacore.tensor_parallel.random import get_rng_tracker

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> Dict[str, Any]:
    """This process's generator states (see the module docstring)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"random": random.getstate(),
            "numpy": [name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)],
            "torch": torch.get_rng_state(),
            "device": device.get_device_rng_state(),
            "tracker": get_rng_tracker().get_states()}


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    device.set_device_rng_state(state["device"])
    get_rng_tracker().set_states(state["tracker"])
