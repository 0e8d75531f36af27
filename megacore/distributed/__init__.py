"""Data parallelism: contiguous bucketed grad buffers, DDP wrapper, FSDP2, grad
finalization, and the schedules' hooks for both (``build_training_hooks``)."""

from megacore.distributed.distributed_data_parallel import DistributedDataParallel
from megacore.distributed.distributed_data_parallel_config import (
    DistributedDataParallelConfig,
)
from megacore.distributed.finalize_model_grads import finalize_model_grads
from megacore.distributed.fully_shard import (
    fully_shard_model,
    fully_sharded_no_sync,
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
from megacore.distributed.training_hooks import build_training_hooks

__all__ = [
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "finalize_model_grads",
    "fully_shard_model",
    "fully_sharded_no_sync",
    "is_fully_sharded",
    "build_training_hooks",
    "BufferLayout",
    "NonFiniteGradientError",
    "ParamAndGradBucket",
    "ParamAndGradBuffer",
    "compute_buffer_layout",
    "shard_range",
]
