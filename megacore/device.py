"""The one place in megacore that knows about accelerators.

Every other module asks this one whether to put tensors on ``cpu`` or ``cuda``, which
``torch.distributed`` backend to use, and how to read or write random-number-generator
state. Nothing else calls ``torch.cuda`` directly: on the CPU build of PyTorch several
``torch.cuda`` calls raise (``current_device``, ``get_rng_state``, ``synchronize``) while
others are silent no-ops, and keeping them behind this module makes the CPU path a
complete path rather than a set of ``if`` statements scattered through the library.

Device choice rule: when ``torch.distributed`` is initialized, its backend decides
(``gloo`` -> cpu, ``nccl`` -> cuda), so a gloo test run on a GPU machine stays on the CPU.
Otherwise CUDA is used when available.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

import torch

__all__ = [
    "accelerator_available",
    "device_type",
    "current_device",
    "default_backend",
    "set_device",
    "synchronize",
    "device_name",
    "manual_seed",
    "manual_seed_current",
    "get_rng_state",
    "set_rng_state",
    "get_device_rng_state",
    "set_device_rng_state",
    "fork_device_rng",
    "memory_allocated",
    "max_memory_allocated",
    "empty_cache",
]


def accelerator_available() -> bool:
    """True when a CUDA device can be used."""
    return torch.cuda.is_available()


def _distributed_backend() -> Optional[str]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return str(torch.distributed.get_backend())
    return None


def device_type() -> str:
    """``"cuda"`` or ``"cpu"``: where megacore puts parameters and activations."""
    backend = _distributed_backend()
    if backend is not None:
        return "cuda" if "nccl" in backend else "cpu"
    return "cuda" if accelerator_available() else "cpu"


def current_device() -> torch.device:
    """The ``torch.device`` of this process (``cuda:<local>`` or ``cpu``)."""
    if device_type() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    return "nccl" if accelerator_available() else "gloo"


def set_device(local_rank: int) -> None:
    """Bind this process to GPU ``local_rank``; a no-op on CPU."""
    if accelerator_available():
        torch.cuda.set_device(local_rank)


def synchronize() -> None:
    """Wait for queued device work (timers, benchmarks); a no-op on CPU."""
    if device_type() == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    """The accelerator's product name (``"cpu"`` without one)."""
    return torch.cuda.get_device_name() if device_type() == "cuda" else "cpu"


def manual_seed_current(seed: int) -> None:
    """Seed only the generator activations draw from (the current GPU's, or the CPU's)."""
    if device_type() == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def manual_seed(seed: int) -> None:
    """Seed the CPU generator and, when present, every CUDA generator."""
    torch.manual_seed(seed)
    if accelerator_available():
        torch.cuda.manual_seed_all(seed)


def get_device_rng_state() -> torch.Tensor:
    """State of the generator that produces random numbers for activations.

    On CUDA this is the current GPU's generator; on CPU it is the default CPU generator
    (dropout on CPU tensors draws from it).
    """
    if device_type() == "cuda":
        return torch.cuda.get_rng_state()
    return torch.get_rng_state()


def set_device_rng_state(state: torch.Tensor) -> None:
    """Inverse of :func:`get_device_rng_state`."""
    if device_type() == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


@contextlib.contextmanager
def fork_device_rng(state: torch.Tensor) -> Iterator[Dict[str, torch.Tensor]]:
    """Run a block with the device generator set to ``state``; restore afterwards.

    Yields a dict whose ``"state"`` entry holds the generator state reached at the end of
    the block (so a caller can continue the stream later).
    """
    saved = get_device_rng_state()
    set_device_rng_state(state)
    out: Dict[str, torch.Tensor] = {}
    try:
        yield out
    finally:
        out["state"] = get_device_rng_state()
        set_device_rng_state(saved)


def get_rng_state() -> Dict[str, Any]:
    """All generator states this process owns (CPU and, when present, CUDA)."""
    state: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if accelerator_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`. A CUDA state is ignored on a CPU-only build."""
    torch.set_rng_state(state["cpu"])
    if accelerator_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def memory_allocated() -> int:
    """Bytes held by tensors on the accelerator; 0 on CPU (not tracked there)."""
    return torch.cuda.memory_allocated() if device_type() == "cuda" else 0


def max_memory_allocated() -> int:
    """Peak bytes held by tensors on the accelerator; 0 on CPU."""
    return torch.cuda.max_memory_allocated() if device_type() == "cuda" else 0


def empty_cache() -> None:
    """Return cached accelerator memory to the driver; a no-op on CPU."""
    if device_type() == "cuda":
        torch.cuda.empty_cache()
