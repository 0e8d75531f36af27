"""Data parallelism: contiguous bucketed grad buffers, DDP wrapper, grad finalization."""

from megacore.distributed.distributed_data_parallel import DistributedDataParallel
from megacore.distributed.distributed_data_parallel_config import (
    DistributedDataParallelConfig,
)
from megacore.distributed.finalize_model_grads import finalize_model_grads
from megacore.distributed.fully_shard import (
    fully_shard_model,
    is_fully_sharded,
)
from megacore.distributed.param_and_grad_buffer import (
    BufferLayout,
    NonFiniteGradientError,
    ParamAndGradBucket,
    ParamAndGradBuffer,
    compute_buffer_layout,
    shard_range,
)

__all__ = [
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "finalize_model_grads",
    "fully_shard_model",
    "is_fully_sharded",
    "BufferLayout",
    "NonFiniteGradientError",
    "ParamAndGradBucket",
    "ParamAndGradBuffer",
    "compute_buffer_layout",
    "shard_range",
]
