"""Tensor-parallel building blocks: collectives as autograd pairs, parallel linear and
embedding layers, vocab-parallel cross entropy, RNG streams and activation recompute."""

from megacore.tensor_parallel.cross_entropy import (
    VocabUtility,
    vocab_parallel_cross_entropy,
)
from megacore.tensor_parallel.layers import (
    ColumnParallelLinear,
    LinearWithGradAccumulationAndAsyncCommunication,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_tensor_model_parallel_attributes,
    linear_with_grad_accumulation_and_async_allreduce,
    param_is_not_tensor_parallel_duplicate,
    set_defaults_if_not_set_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
)
from megacore.tensor_parallel.mappings import (
    all_gather_along_dim,
    all_reduce,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_along_first_dim,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
    split_along_dim,
)
from megacore.tensor_parallel.random import (
    DATA_PARALLEL_RNG_TRACKER_NAME,
    EXPERT_PARALLEL_RNG_TRACKER_NAME,
    MODEL_PARALLEL_RNG_TRACKER_NAME,
    RNGStatesTracker,
    get_cuda_rng_tracker,
    get_rng_tracker,
    keyed_stream,
    model_parallel_cuda_manual_seed,
    model_parallel_manual_seed,
)
from megacore.tensor_parallel.recompute import CheckpointFunction, checkpoint

__all__ = [
    # layers
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "LinearWithGradAccumulationAndAsyncCommunication",
    "linear_with_grad_accumulation_and_async_allreduce",
    "set_tensor_model_parallel_attributes",
    "set_defaults_if_not_set_tensor_model_parallel_attributes",
    "copy_tensor_model_parallel_attributes",
    "param_is_not_tensor_parallel_duplicate",
    # cross entropy
    "vocab_parallel_cross_entropy",
    "VocabUtility",
    # mappings
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "all_reduce",
    "all_gather_along_dim",
    "reduce_scatter_along_first_dim",
    "split_along_dim",
    # random and recompute
    "RNGStatesTracker",
    "get_rng_tracker",
    "get_cuda_rng_tracker",
    "keyed_stream",
    "model_parallel_manual_seed",
    "model_parallel_cuda_manual_seed",
    "MODEL_PARALLEL_RNG_TRACKER_NAME",
    "DATA_PARALLEL_RNG_TRACKER_NAME",
    "EXPERT_PARALLEL_RNG_TRACKER_NAME",
    "checkpoint",
    "CheckpointFunction",
]
