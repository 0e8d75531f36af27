"""Tensor-parallel building blocks: RNG streams (more arrive with the layers)."""

from megacore.tensor_parallel.random import (
    DATA_PARALLEL_RNG_TRACKER_NAME,
    EXPERT_PARALLEL_RNG_TRACKER_NAME,
    MODEL_PARALLEL_RNG_TRACKER_NAME,
    RNGStatesTracker,
    get_cuda_rng_tracker,
    get_rng_tracker,
    model_parallel_cuda_manual_seed,
    model_parallel_manual_seed,
)

__all__ = [
    "RNGStatesTracker",
    "get_rng_tracker",
    "get_cuda_rng_tracker",
    "model_parallel_manual_seed",
    "model_parallel_cuda_manual_seed",
    "MODEL_PARALLEL_RNG_TRACKER_NAME",
    "DATA_PARALLEL_RNG_TRACKER_NAME",
    "EXPERT_PARALLEL_RNG_TRACKER_NAME",
]
