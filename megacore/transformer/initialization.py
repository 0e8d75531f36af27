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

import concurrent.futures
import contextlib
import hashlib
import math
from typing import Callable, Iterator

import torch

__all__ = ["init_method_normal", "scaled_init_method_normal", "init_rng_scope",
           "derive_seed", "normal_fill_"]


_CHUNK = 1 << 22  # elements per independently seeded chunk (16 MB of float32)


def _chunk_seed(base: int, index: int) -> int:
    return (base * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)


def _fill_chunk(flat: torch.Tensor, base: int, index: int, mean: float, std: float) -> None:
    gen = torch.Generator(device=flat.device).manual_seed(_chunk_seed(base, index))
    flat[index * _CHUNK:(index + 1) * _CHUNK].normal_(mean, std, generator=gen)


def normal_fill_(tensor: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Fill ``tensor`` from N(mean, std^2) in parallel, as a function of one seed.

    A tensor of at most ``2**22`` elements gets a plain ``normal_`` from the default
    generator. A larger one: one 62-bit seed is drawn from the default generator of the
    tensor's device (so the result follows ``torch.manual_seed`` and
    :func:`init_rng_scope` like a plain ``normal_``); the flattened tensor is cut into
    fixed chunks of ``2**22`` elements,
    each filled from its own generator seeded by (seed, chunk index), on all intra-op
    threads. The values depend only on the seed and the tensor's size, not on the thread
    count, so the full master weights stay layout-independent. A single-threaded
    ``normal_`` draws ~70 M values/s on this CPU: a 1B-parameter model took ~15 s.
    """
    if tensor.numel() <= _CHUNK:  # one chunk: a plain normal_ from the default generator
        with torch.no_grad():
            return tensor.normal_(mean, std)
    if not tensor.is_contiguous():  # not a case init methods meet: fill a copy
        dense = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        with torch.no_grad():
            return tensor.copy_(normal_fill_(dense, mean, std))
    base = int(torch.randint(0, 1 << 62, (1,), device=tensor.device).item())
    flat = tensor.detach().view(-1)
    chunks = -(-flat.numel() // _CHUNK)
    threads = min(torch.get_num_threads(), chunks)
    with torch.no_grad():
        if threads <= 1 or tensor.device.type != "cpu":
            for index in range(chunks):
                _fill_chunk(flat, base, index, mean, std)
        else:
            # torch releases the GIL inside normal_: the chunks fill in parallel.
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda i: _fill_chunk(flat, base, i, mean, std), range(chunks)))
    return tensor


def init_method_normal(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fill a tensor from N(0, sigma^2) (with :func:`normal_fill_`: parallel, one seed)."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return normal_fill_(tensor, 0.0, sigma)

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
