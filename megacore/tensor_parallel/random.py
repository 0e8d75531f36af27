"""Seeded random-number streams for model-parallel training, and activation recompute.

Dropout and initialization must draw the *same* random numbers where tensors are
replicated (e.g. across tensor-parallel ranks for activations outside the tp region) and
*different* ones where tensors are split. The :class:`RNGStatesTracker` keeps named
generator states; ``with tracker.fork(name):`` runs a block on that stream and saves
where it stopped, leaving the default stream untouched.

Streams set up by :func:`model_parallel_manual_seed` (Megatron's offsets):

========================  ==========================================  ======================
stream                    seed                                        same across
========================  ==========================================  ======================
default generator         ``seed``                                    tp, cp ranks
``model-parallel-rng``    ``seed + 2718 + tp_rank``                   nothing (per tp rank)
``data-parallel-rng``     ``seed``                                    everything
``expert-parallel-rng``   ``seed + 1024 + 100 * ep_rank + etp_rank``  expert-dp ranks
========================  ==========================================  ======================

On CPU the tracked generator is torch's default CPU generator; on CUDA the current GPU's
(all through :mod:`megacore.device`).

Keyed streams (:meth:`RNGStatesTracker.fork_keyed`) are created on first use from the base
seed and a name, e.g. one per transformer layer for its dropout. A module that draws only
from its own stream gets the same random numbers wherever it runs: on any pipeline stage,
in any order relative to other modules, and again on recompute (the checkpoint restores
the tracker's states).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Dict, Iterator, Optional

import torch

from megacore import device
from megacore import parallel_state as ps

__all__ = [
    "RNGStatesTracker",
    "get_rng_tracker",
    "get_cuda_rng_tracker",
    "model_parallel_manual_seed",
    "model_parallel_cuda_manual_seed",
    "MODEL_PARALLEL_RNG_TRACKER_NAME",
    "DATA_PARALLEL_RNG_TRACKER_NAME",
    "EXPERT_PARALLEL_RNG_TRACKER_NAME",
    "keyed_stream",
]

MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
DATA_PARALLEL_RNG_TRACKER_NAME = "data-parallel-rng"
EXPERT_PARALLEL_RNG_TRACKER_NAME = "expert-parallel-rng"


class RNGStatesTracker:
    """Named device-generator states that code can fork into and out of."""

    def __init__(self) -> None:
        self._states: Dict[str, torch.Tensor] = {}
        self._seeds: set = set()
        self.base_seed: Optional[int] = None

    def reset(self) -> None:
        self._states = {}
        self._seeds = set()
        self.base_seed = None

    def is_initialized(self) -> bool:
        return bool(self._states)

    def get_states(self) -> Dict[str, torch.Tensor]:
        """A copy of every tracked state (for checkpoints and recompute)."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Start stream ``name`` from ``seed``; names and seeds must be unique."""
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already used by another RNG stream")
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        self._seeds.add(seed)
        self._states[name] = _fresh_state(seed)

    def keyed_seed(self, name: str) -> int:
        """Seed of keyed stream ``name``: a hash of the base seed and the name."""
        if self.base_seed is None:
            raise RuntimeError("keyed RNG streams need model_parallel_manual_seed(seed) first")
        digest = hashlib.sha256(f"{self.base_seed}/{name}".encode()).digest()
        return int.from_bytes(digest[:7], "little")

    @contextlib.contextmanager
    def fork_keyed(self, name: str) -> Iterator[None]:
        """Like :meth:`fork`, creating stream ``name`` from :meth:`keyed_seed` on first use."""
        if name not in self._states:
            # Derived, not registered: a recompute that rolled the tracker back to before
            # this stream existed re-creates it with the same seed, hence the same numbers.
            self._states[name] = _fresh_state(self.keyed_seed(name))
        with self.fork(name):
            yield

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the block on stream ``name``; the default stream is restored afterwards."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} is not set up; call "
                           "model_parallel_manual_seed(seed) after initialize_model_parallel")
        with device.fork_device_rng(self._states[name]) as out:
            yield
        self._states[name] = out["state"]


@contextlib.contextmanager
def keyed_stream(name: Optional[str]) -> Iterator[None]:
    """Draw from keyed stream ``name`` inside the block; a no-op without a name or before
    :func:`model_parallel_manual_seed` (the default generator is used then)."""
    if name is None or _TRACKER.base_seed is None:
        yield
        return
    with _TRACKER.fork_keyed(name):
        yield


def _fresh_state(seed: int) -> torch.Tensor:
    """The device generator's state right after seeding with ``seed``."""
    saved = device.get_device_rng_state()
    device.manual_seed_current(seed)
    state = device.get_device_rng_state()
    device.set_device_rng_state(saved)
    return state


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker used by dropout, initialization and recompute."""
    return _TRACKER


# Megatron's name, kept so ported code runs unchanged (the tracker also works on CPU).
get_cuda_rng_tracker = get_rng_tracker


def model_parallel_manual_seed(seed: int, *, tp_rank: Optional[int] = None,
                               ep_rank: Optional[int] = None,
                               etp_rank: Optional[int] = None) -> None:
    """Seed the default generator and the tracker's streams (table in the module docstring).

    Ranks default to this process's ranks in the default grid of
    :mod:`megacore.parallel_state` (0 when it is not initialized).
    """
    initialized = ps.model_parallel_is_initialized()
    if tp_rank is None:
        tp_rank = ps.get_tensor_model_parallel_rank() if initialized else 0
    if ep_rank is None:
        ep_rank = ps.get_expert_model_parallel_rank() if initialized else 0
    if etp_rank is None:
        etp_rank = ps.get_expert_tensor_parallel_rank() if initialized else 0
    device.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.base_seed = seed
    _TRACKER.add(DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    _TRACKER.add(MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    _TRACKER.add(EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


model_parallel_cuda_manual_seed = model_parallel_manual_seed
