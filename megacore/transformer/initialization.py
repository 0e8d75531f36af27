"""Weight initialization that does not depend on how the model is split.

The numerical contract (``docs/ARCHITECTURE.md``, section 2) asks that a model split over
tp ranks or pipeline stages from one seed equals the single-process model from that seed. The
tensor-parallel layers already draw each *full* master weight on the CPU and keep their
shard, so tp does not change what is drawn. Pipeline splits do: a stage that builds only
layers 5-8 would otherwise draw them from a generator that never produced layers 1-4.

:func:`init_rng_scope` fixes that. Each module that owns weights (a transformer layer,
the embedding, the output layer) is built inside a scope keyed by a stable name such as
``"layer.7"``. Inside, the default CPU generator is re-seeded from
``hash(torch.initial_seed(), key)``; on exit its state is restored, so building a module
neither depends on nor disturbs what was drawn before. ``torch.initial_seed()`` is the
seed last given to ``torch.manual_seed`` (``model_parallel_manual_seed`` sets it), so
every rank that was seeded alike builds identical master weights for the same key.
Scopes may nest: the inner seed is derived from the outer one, again independent of
layout.

Requirement on callers: seed the default generator identically on every rank (all tp,
pp, dp ranks) before building a model. Offsetting the seed per pipeline stage, as
Megatron-LM's training script does for dropout, must happen after construction.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Callable, Iterator

import torch

__all__ = ["init_method_normal", "scaled_init_method_normal", "init_rng_scope",
           "derive_seed"]


def init_method_normal(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fill a tensor from N(0, sigma^2)."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=sigma)

    return init_


def scaled_init_method_normal(sigma: float, num_layers: int,
                              multiplier: float = 2.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, (sigma / sqrt(multiplier * num_layers))^2): for layers that write the residual.

    Each layer adds two such outputs (attention and MLP) to the residual stream, so the
    default multiplier 2 keeps the residual's variance independent of depth (GPT-2).
    """
    return init_method_normal(sigma / math.sqrt(multiplier * num_layers))


def derive_seed(base_seed: int, key: str) -> int:
    """A 63-bit seed from ``base_seed`` and ``key``, stable across processes and runs.

    Python's ``hash`` of a string is salted per process, hence sha256.
    """
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def init_rng_scope(key: str) -> Iterator[None]:
    """Build the block's weights from a CPU generator seeded by ``(initial seed, key)``.

    The CPU generator state before the block is restored afterwards (and so is the seed
    reported by ``torch.initial_seed()``). Only the CPU generator is touched: master
    weights are always drawn on the CPU (see ``megacore.tensor_parallel.layers``).
    """
    seed = derive_seed(torch.initial_seed(), key)
    state = torch.get_rng_state()
    outer_seed = torch.initial_seed()
    # default_generator only: torch.manual_seed would also reseed (and so disturb) CUDA.
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        # manual_seed then set_rng_state restores both the stream and initial_seed().
        torch.default_generator.manual_seed(outer_seed)
        torch.set_rng_state(state)
