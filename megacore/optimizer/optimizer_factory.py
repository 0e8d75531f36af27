"""``get_megatron_optimizer``: param groups and the right wrapper for a config.

Param groups (Megatron's rules): a param gets no weight decay when
``no_weight_decay_cond(name, param)`` says so (default: biases and 1-D params such as
norm weights), and its learning rate multiplied by ``lr_mult`` when
``scale_lr_cond(name, param)`` says so. Params with the same (wd_mult, lr_mult,
is_expert_parallel) share a group; groups carry ``wd_mult``, ``lr_mult``, ``max_lr``,
``min_lr`` for the param scheduler.

Wrapper choice: ``use_distributed_optimizer`` -> :class:`DistributedOptimizer`;
FSDP2-sharded chunks (``fully_shard_model``) keep fp32 master params themselves ->
:class:`FP32Optimizer` over the DTensor params;
fp16/bf16 -> :class:`Float16OptimizerWithFloat16Params`; else :class:`FP32Optimizer`.
Dense and expert params (``allreduce=False``, reduced over another dp group) get one
wrapper each, joined in a :class:`ChainedOptimizer`.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from megacore import parallel_state
from megacore.distributed import DistributedDataParallel, is_fully_sharded
from megacore.optimizer.clip_grads import GradStatsContext
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

__all__ = ["get_param_groups", "get_megatron_optimizer", "get_optimizer"]

ParamCond = Callable[[str, torch.nn.Parameter], bool]


def _default_no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return name.endswith(".bias") or len(param.shape) == 1


def get_param_groups(model_chunks: List[torch.nn.Module], config: OptimizerConfig,
                     no_weight_decay_cond: Optional[ParamCond] = None,
                     scale_lr_cond: Optional[ParamCond] = None,
                     lr_mult: float = 1.0) -> List[dict]:
    """Torch param groups over the trainable params of ``model_chunks``."""
    no_wd = no_weight_decay_cond or _default_no_weight_decay
    groups: Dict[Tuple[float, float, bool, bool], List[torch.nn.Parameter]] = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            wd_mult = 0.0 if no_wd(name, param) else 1.0
            scaled = scale_lr_cond is not None and scale_lr_cond(name, param)
            decoupled = config.decoupled_lr is not None and \
                getattr(param, "is_embedding_or_output_parameter", False)
            key = (wd_mult, lr_mult if scaled else 1.0, not getattr(param, "allreduce", True),
                   decoupled)
            groups.setdefault(key, []).append(param)
    out = []
    for (wd_mult, mult, expert, decoupled), params in groups.items():
        lr, min_lr = _group_lr_range(config, decoupled)
        out.append({"params": params, "wd_mult": wd_mult, "lr_mult": mult,
                    "is_expert_parallel": expert, "max_lr": lr, "min_lr": min_lr,
                    "lr": lr * mult, "weight_decay": config.weight_decay * wd_mult})
    return out


def _group_lr_range(config: OptimizerConfig, decoupled: bool) -> Tuple[float, float]:
    """(max_lr, min_lr) of a param group; ``decoupled``: the embedding/output group of
    ``config.decoupled_lr`` (Megatron's --decoupled-lr / --decoupled-min-lr)."""
    lr = config.lr if config.lr is not None else 0.0
    min_lr = config.min_lr if config.min_lr is not None else 0.0
    if decoupled:
        lr = config.decoupled_lr
        if config.decoupled_min_lr is not None:
            min_lr = config.decoupled_min_lr
    return lr, min_lr


def _torch_optimizer(config: OptimizerConfig, param_groups: List[dict]) -> torch.optim.Optimizer:
    lr = config.lr if config.lr is not None else 0.0
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=config.weight_decay,
                               momentum=config.sgd_momentum)
    adam = torch.optim.AdamW if (config.optimizer == "adamw"
                                 or config.decoupled_weight_decay) else torch.optim.Adam
    return adam(param_groups, lr=lr, weight_decay=config.weight_decay,
                betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)


def _grad_scaler(config: OptimizerConfig) -> Optional[MegatronGradScaler]:
    if config.loss_scale is not None:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(initial_scale=config.initial_loss_scale,
                                 min_scale=config.min_loss_scale, growth_factor=2.0,
                                 backoff_factor=0.5, growth_interval=config.loss_scale_window,
                                 hysteresis=config.hysteresis)
    return None


def _stats_context(pgs: parallel_state.ProcessGroupCollection, distributed: bool
                   ) -> GradStatsContext:
    return GradStatsContext(
        tp_rank=pgs.rank("tp"), expert_tp_rank=pgs.rank("expt_tp"),
        is_first_pipeline_stage=pgs.rank("pp") == 0,
        dense_replicas=1 if distributed else pgs.size("dp_cp"),
        expert_replicas=1 if distributed else pgs.size("expt_dp"))


def _buffers(model_chunks: List[torch.nn.Module], expert: bool) -> list:
    buffers = []
    for chunk in model_chunks:
        if not isinstance(chunk, DistributedDataParallel):
            raise TypeError("use_distributed_optimizer needs every model chunk wrapped in "
                            f"DistributedDataParallel, got {type(chunk).__name__}")
        buffers += chunk.expert_parallel_buffers if expert else chunk.buffers
    return buffers


def _build(config: OptimizerConfig, groups: List[dict], model_chunks: List[torch.nn.Module],
           pgs: parallel_state.ProcessGroupCollection, expert: bool) -> MegatronOptimizer:
    factory = functools.partial(_torch_optimizer, config)
    names = param_names(model_chunks)
    scaler = _grad_scaler(config)
    # The distributed optimizer's and FSDP2's grads are disjoint shards over dp.
    sharded = config.use_distributed_optimizer or any(is_fully_sharded(c) for c in model_chunks)
    stats = _stats_context(pgs, sharded)
    if config.use_distributed_optimizer:
        return DistributedOptimizer(groups, factory, config, scaler, stats, names,
                                    _buffers(model_chunks, expert))
    if config.fp16 or config.bf16:
        return Float16OptimizerWithFloat16Params(groups, factory, config, scaler, stats, names)
    return FP32Optimizer(groups, factory, config, scaler, stats, names)


def get_megatron_optimizer(config: OptimizerConfig, model_chunks: List[torch.nn.Module],
                           no_weight_decay_cond: Optional[ParamCond] = None,
                           scale_lr_cond: Optional[ParamCond] = None, lr_mult: float = 1.0,
                           *, pg_collection: Optional[parallel_state.ProcessGroupCollection]
                           = None) -> Union[MegatronOptimizer, ChainedOptimizer]:
    """Build the optimizer for ``model_chunks`` (usually DDP-wrapped).

    Args:
        config: optimizer settings.
        model_chunks: this rank's model chunks (one, or several for interleaved pipelines).
        no_weight_decay_cond: ``(name, param) -> bool``; default: biases and 1-D params.
        scale_lr_cond: ``(name, param) -> bool``: params whose lr is times ``lr_mult``.
        lr_mult: learning-rate multiplier for ``scale_lr_cond`` params.
        pg_collection: explicit groups (default: ``parallel_state``'s).

    Returns a single wrapper, or a :class:`ChainedOptimizer` when the model has expert
    params. Every rank must call this (the step runs collectives over all ranks).
    """
    pgs = pg_collection or parallel_state.get_process_group_collection()
    groups = get_param_groups(model_chunks, config, no_weight_decay_cond, scale_lr_cond,
                              lr_mult)
    dense = [g for g in groups if not g["is_expert_parallel"]]
    expert = [g for g in groups if g["is_expert_parallel"]]
    optimizers = []
    if dense or not expert:
        # A rank without params still steps (the step's all-reduce spans all ranks).
        dense = dense or [{"params": [], "wd_mult": 1.0, "lr_mult": 1.0,
                           "is_expert_parallel": False}]
        optimizers.append(_build(config, dense, model_chunks, pgs, expert=False))
    if expert:
        optimizers.append(_build(config, expert, model_chunks, pgs, expert=True))
    return optimizers[0] if len(optimizers) == 1 else ChainedOptimizer(optimizers)


get_optimizer = get_megatron_optimizer
"""Alias of :func:`get_megatron_optimizer`."""
