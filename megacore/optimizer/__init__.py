"""Optimizers: mixed precision with fp32 main params, the distributed (ZeRO-1) optimizer,
loss scaling, global-norm gradient clipping and the learning-rate/weight-decay schedule."""

from megacore.optimizer.clip_grads import (
    GradStatsContext,
    clip_grad_by_total_norm_fp32,
    local_grad_norm_squared,
    local_num_zeros,
)
from megacore.optimizer.distrib_optimizer import DistributedOptimizer
from megacore.optimizer.grad_scaler import (
    ConstantGradScaler,
    DynamicGradScaler,
    MegatronGradScaler,
)
from megacore.optimizer.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MegatronOptimizer,
    param_names,
)
from megacore.optimizer.optimizer_config import OptimizerConfig
from megacore.optimizer.optimizer_factory import (
    get_megatron_optimizer,
    get_optimizer,
    get_param_groups,
)
from megacore.optimizer.optimizer_param_scheduler import OptimizerParamScheduler

__all__ = [
    "OptimizerConfig",
    "get_megatron_optimizer",
    "get_optimizer",
    "get_param_groups",
    "MegatronOptimizer",
    "FP32Optimizer",
    "Float16OptimizerWithFloat16Params",
    "DistributedOptimizer",
    "ChainedOptimizer",
    "MegatronGradScaler",
    "ConstantGradScaler",
    "DynamicGradScaler",
    "OptimizerParamScheduler",
    "GradStatsContext",
    "clip_grad_by_total_norm_fp32",
    "local_grad_norm_squared",
    "local_num_zeros",
    "param_names",
]
