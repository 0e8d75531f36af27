"""``OptimizerConfig``: which optimizer, its hyper-parameters, precision and clipping.

Field names are Megatron-Core's. As in Megatron, ``optimizer="adam"`` means Adam with
decoupled weight decay (AdamW, what Apex FusedAdam does by default); set
``decoupled_weight_decay=False`` for L2-regularized Adam.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from megacore.config_error import FieldError

__all__ = ["OptimizerConfig"]

_OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclasses.dataclass
class OptimizerConfig:
    """Optimizer, learning rate, precision, loss scaling and gradient clipping."""

    # -- optimizer and learning rate ----------------------------------------------------
    optimizer: str = "adam"
    """``"adam"`` (= AdamW, Megatron's meaning), ``"adamw"``, or ``"sgd"``."""

    lr: Optional[float] = None
    """Initial learning rate; the param scheduler overwrites it every step."""

    min_lr: Optional[float] = None
    """Floor of the decayed learning rate (read by the param scheduler per group)."""

    decoupled_lr: Optional[float] = None
    """Peak learning rate of the input embedding and output layer params (those marked
    ``is_embedding_or_output_parameter``), scheduled like ``lr`` (None: ``lr``)."""

    decoupled_min_lr: Optional[float] = None
    """Floor of the decayed learning rate of those params (None: ``min_lr``)."""

    weight_decay: float = 0.01
    """Weight decay for params that decay (not biases or 1-D norm params)."""

    decoupled_weight_decay: bool = True
    """``"adam"`` uses decoupled weight decay (torch AdamW); False gives torch Adam with
    L2 regularization added to the gradient."""

    adam_beta1: float = 0.9
    """Adam's first-moment decay."""

    adam_beta2: float = 0.999
    """Adam's second-moment decay."""

    adam_eps: float = 1e-08
    """Added to Adam's denominator for stability."""

    sgd_momentum: float = 0.9
    """Momentum of SGD."""

    # -- precision ----------------------------------------------------------------------
    fp16: bool = False
    """Model params are fp16: keep fp32 main params and use a loss scaler."""

    bf16: bool = False
    """Model params are bf16: keep fp32 main params (no loss scaling needed)."""

    params_dtype: torch.dtype = torch.float32
    """dtype of the model's params (informational; the optimizer reads each param)."""

    # -- loss scaling (fp16) ------------------------------------------------------------
    loss_scale: Optional[float] = None
    """A constant loss scale; None: dynamic loss scaling (fp16 only)."""

    initial_loss_scale: float = 2.0 ** 32
    """Starting scale of the dynamic scaler."""

    min_loss_scale: float = 1.0
    """The dynamic scaler never backs off below this."""

    loss_scale_window: int = 1000
    """Clean steps after which the dynamic scale doubles."""

    hysteresis: int = 2
    """Overflowing steps tolerated before the dynamic scale halves."""

    # -- distributed optimizer, clipping, logging ---------------------------------------
    use_distributed_optimizer: bool = False
    """Shard fp32 main params and optimizer state over data-parallel ranks (ZeRO-1).
    The models must be wrapped in ``DistributedDataParallel`` with the same setting."""

    clip_grad: float = 1.0
    """Clip grads to this global L2 norm (over all ranks); 0 disables clipping."""

    log_num_zeros_in_grad: bool = False
    """Count zero entries in the (global) gradient each step; costs one reduction."""

    timers: Optional[Callable] = None
    """Timer factory (None: no timing)."""

    def __post_init__(self):
        if self.optimizer not in _OPTIMIZERS:
            raise FieldError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}",
                             "optimizer")
        if self.fp16 and self.bf16:
            raise FieldError("fp16 and bf16 are mutually exclusive; set at most one",
                             "fp16", "bf16")
        if self.lr is not None and self.lr < 0:
            raise FieldError(f"lr must be >= 0, got {self.lr}", "lr")
        if self.min_lr is not None and self.min_lr < 0:
            raise FieldError(f"min_lr must be >= 0, got {self.min_lr}", "min_lr")
        if self.weight_decay < 0:
            raise FieldError(f"weight_decay must be >= 0, got {self.weight_decay}", "weight_decay")
        if self.decoupled_lr is not None and self.decoupled_lr < 0:
            raise FieldError(f"decoupled_lr must be >= 0, got {self.decoupled_lr}", "decoupled_lr")
        if self.decoupled_min_lr is not None and self.decoupled_min_lr < 0:
            raise FieldError(f"decoupled_min_lr must be >= 0, got {self.decoupled_min_lr}",
                             "decoupled_min_lr")
        if self.clip_grad < 0:
            raise FieldError(f"clip_grad must be >= 0 (0 disables), got {self.clip_grad}",
                             "clip_grad")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise FieldError(f"loss_scale must be positive or None, got {self.loss_scale}",
                             "loss_scale")
        if self.loss_scale_window < 1:
            raise FieldError(f"loss_scale_window must be >= 1, got {self.loss_scale_window}",
                             "loss_scale_window")
        if self.hysteresis < 1:
            raise FieldError(f"hysteresis must be >= 1, got {self.hysteresis}", "hysteresis")
        if not 0.0 < self.min_loss_scale <= self.initial_loss_scale:
            raise FieldError("min_loss_scale must be in (0, initial_loss_scale], got "
                             f"{self.min_loss_scale}", "min_loss_scale", "initial_loss_scale")
