"""Megatron-style optimizer wrappers: fp32, mixed precision (fp32 main params), chained.

A wrapper owns a ``torch.optim`` optimizer over *main* params and moves data between
them and the model:

    model grads (param.main_grad, fp32 DDP buffer) -> main grads -> unscale / check
    Inf-NaN -> global norm, clip -> torch step on main params -> copy to model params

* :class:`FP32Optimizer`: fp32 model params are their own main params.
* :class:`Float16OptimizerWithFloat16Params`: fp16/bf16 model params get fp32 main
  copies (fp32 params in the same model are used directly); fp16 adds a loss scaler.
* :class:`ChainedOptimizer`: several wrappers stepped as one (dense and expert params,
  whose data-parallel groups differ).
* ``DistributedOptimizer`` (``distrib_optimizer.py``) shards the main params.

``step()`` returns ``(update_successful, grad_norm, num_zeros_in_grad)``. Every rank
makes the same skip decision: the overflow flag, the squared norm and the zero count are
summed in one all-reduce over all ranks (see ``clip_grads.py`` for the weighting).

State dict (the same format for every wrapper, independent of data-parallel size)::

    {"param_groups": [hyper-parameters of each torch param group, without params],
     "params": {"<chunk>/<param name>": {"main_param": fp32 tensor of the param's shape,
                                         "exp_avg": ..., "exp_avg_sq": ..., "step": 0-dim}},
     "grad_scaler": scaler state or None}

Tensor entries have the full (tp-local) param shape, so a distributed optimizer saved at
one data-parallel size loads at any other, and into a plain optimizer. The dict is the
same on every data-parallel rank of a (tp, pp) position: save it from dp rank 0.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megacore import device
from megacore.distributed import DistributedDataParallel
from megacore.optimizer.clip_grads import (
    GradStatsContext,
    clip_grad_by_total_norm_fp32,
    local_grad_norm_squared,
    local_num_zeros,
)
from megacore.optimizer.grad_scaler import MegatronGradScaler
from megacore.optimizer.optimizer_config import OptimizerConfig

__all__ = ["MegatronOptimizer", "FP32Optimizer", "Float16OptimizerWithFloat16Params",
           "ChainedOptimizer", "param_names", "OptimizerFactory"]

OptimizerFactory = Any  # Callable[[List[dict]], torch.optim.Optimizer]
_HALF = (torch.float16, torch.bfloat16)


def param_names(model_chunks: Sequence[torch.nn.Module]) -> Dict[torch.nn.Parameter, str]:
    """Stable, data-parallel-independent keys ``"<chunk index>/<name>"`` for every param
    (names as in the unwrapped module: a DDP wrapper's ``module.`` prefix is dropped)."""
    names: Dict[torch.nn.Parameter, str] = {}
    for index, chunk in enumerate(model_chunks):
        module = chunk.module if isinstance(chunk, DistributedDataParallel) else chunk
        for name, param in module.named_parameters():
            names.setdefault(param, f"{index}/{name}")
    return names


def _model_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


class MegatronOptimizer:
    """Base wrapper: loss scaling, the shared step sequence, state dicts.

    Subclasses fill ``self._entries`` with ``(model_param, main_param)`` pairs and
    implement the three copy hooks.

    Args:
        optimizer: the torch optimizer over main params.
        config: optimizer settings (clipping, zero counting).
        grad_scaler: loss scaler (fp16), or None.
        stats: how this optimizer's grads count in global statistics.
        names: state-dict key of every model param (see :func:`param_names`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig,
                 grad_scaler: Optional[MegatronGradScaler], stats: GradStatsContext,
                 names: Dict[torch.nn.Parameter, str]):
        self.optimizer = optimizer
        self.config = config
        self.grad_scaler = grad_scaler
        self.stats = stats
        self.names = names
        self._entries: List[Tuple[torch.nn.Parameter, torch.Tensor]] = []

    # -- hooks for subclasses ----------------------------------------------------------
    def _copy_model_grads_to_main_grads(self) -> None:
        raise NotImplementedError

    def _copy_main_params_to_model_params(self) -> None:
        raise NotImplementedError

    def reload_model_params(self) -> None:
        """Copy model params into the main params (after loading model weights only)."""
        raise NotImplementedError

    # -- torch-optimizer-like surface --------------------------------------------------
    @property
    def param_groups(self) -> List[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def get_parameters(self) -> List[torch.Tensor]:
        """The main params this optimizer updates."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def get_loss_scale(self) -> torch.Tensor:
        if self.grad_scaler is None:
            return torch.ones(1, dtype=torch.float32)
        return self.grad_scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale`` (the schedules' ``grad_scale_func``)."""
        return loss * self.get_loss_scale().to(loss.device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` of model and main params (DDP buffers: ``zero_grad_buffer``)."""
        for model_param, main_param in self._entries:
            for tensor in (model_param, main_param):
                if set_to_none:
                    tensor.grad = None
                elif tensor.grad is not None:
                    tensor.grad.zero_()

    # -- step pieces (driven by _step_optimizers) --------------------------------------
    def _main_grads_and_params(self) -> List[Tuple[Optional[torch.Tensor], torch.Tensor]]:
        return [(main.grad, model) for model, main in self._entries]

    def _unscale_and_find_inf(self) -> bool:
        """Divide main grads by the loss scale; True if any entry is Inf/NaN here."""
        inv_scale = self.grad_scaler.inv_scale
        found = False
        for grad, _ in self._main_grads_and_params():
            if grad is not None:
                grad.mul_(inv_scale.to(grad.device))
                found = found or not bool(torch.isfinite(grad).all())
        return found

    def _clip(self, total_norm: float) -> None:
        if self.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32([g for g, _ in self._main_grads_and_params()],
                                         self.config.clip_grad, total_norm)

    def step_with_ready_grads(self) -> bool:
        """Run the torch step on main params and copy them to the model."""
        self.optimizer.step()
        self._copy_main_params_to_model_params()
        return True

    @torch.no_grad()
    def step(self) -> Tuple[bool, Optional[float], Optional[int]]:
        """One update. Returns ``(update_successful, grad_norm, num_zeros_in_grad)``;
        ``(False, None, None)`` when the step was skipped for Inf/NaN grads."""
        return _step_optimizers([self], self.config)

    # -- state dict --------------------------------------------------------------------
    def _param_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        out = {}
        for model, main in self._entries:
            entry = {"main_param": main.detach().float().clone().view(model.shape)}
            for key, value in self.optimizer.state.get(main, {}).items():
                if torch.is_tensor(value):
                    value = value.detach().clone()
                    entry[key] = value.view(model.shape) if value.dim() else value
            out[self.names[model]] = entry
        return out

    def _load_param_state(self, params: Dict[str, Dict[str, torch.Tensor]]) -> None:
        _check_keys(params, [self.names[m] for m, _ in self._entries])
        for model, main in self._entries:
            saved = params[self.names[model]]
            main.data.copy_(saved["main_param"].view(main.shape))
            self.optimizer.state[main] = {
                key: (value.clone().view(main.shape).to(main.dtype) if value.dim()
                      else value.clone())
                for key, value in saved.items() if key != "main_param"}
        self._copy_main_params_to_model_params()

    def state_dict(self) -> Dict[str, Any]:
        """Data-parallel-independent state (format in the module docstring)."""
        return {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                 for g in self.optimizer.param_groups],
                "params": self._param_state(),
                "grad_scaler": None if self.grad_scaler is None
                else self.grad_scaler.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; also updates the model params."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.optimizer.param_groups):
            raise ValueError(f"state dict has {len(groups)} param groups, the optimizer "
                             f"{len(self.optimizer.param_groups)}")
        for group, saved in zip(self.optimizer.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        if self.grad_scaler is not None and state_dict.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        self._load_param_state(state_dict["params"])


def _check_keys(saved: Dict[str, Any], needed: List[str]) -> None:
    missing = [k for k in needed if k not in saved]
    if missing:
        raise KeyError(f"optimizer state dict lacks {len(missing)} params, e.g. {missing[:3]}")


def _step_optimizers(optimizers: Sequence[MegatronOptimizer], config: OptimizerConfig
                     ) -> Tuple[bool, Optional[float], Optional[int]]:
    """The shared step: copy grads, unscale, one all-reduce of (overflow, norm^2,
    zeros), skip or clip, torch step, copy params back."""
    for opt in optimizers:
        opt._copy_model_grads_to_main_grads()
    scaled = [opt for opt in optimizers if opt.grad_scaler is not None]
    found_inf = any([opt._unscale_and_find_inf() for opt in scaled])
    dev = device.current_device()
    stats = torch.zeros(3, dtype=torch.float64, device=dev)  # [overflow, norm^2, zeros]
    stats[0] = float(found_inf)
    for opt in optimizers:
        pairs = opt._main_grads_and_params()
        stats[1:2] += local_grad_norm_squared(pairs, opt.stats, dev)
        if config.log_num_zeros_in_grad:
            stats[2:3] += local_num_zeros(pairs, opt.stats, dev)
    # Every rank must take the same branch below: reduce over all ranks.
    dist.all_reduce(stats)
    found_inf = bool(stats[0] > 0)
    for opt in scaled:
        opt.grad_scaler.update(found_inf)
    if found_inf:
        return False, None, None
    grad_norm = math.sqrt(float(stats[1]))
    for opt in optimizers:
        opt._clip(grad_norm)
    num_zeros = int(round(float(stats[2]))) if config.log_num_zeros_in_grad else None
    success = all([opt.step_with_ready_grads() for opt in optimizers])
    return success, grad_norm, num_zeros


class FP32Optimizer(MegatronOptimizer):
    """fp32 model params updated in place; grads taken from ``param.main_grad``.

    Args:
        param_groups: torch param groups over model params.
        optimizer_factory: builds the torch optimizer from param groups.
        config, grad_scaler, stats, names: see :class:`MegatronOptimizer`.
    """

    def __init__(self, param_groups: List[dict], optimizer_factory: OptimizerFactory,
                 config: OptimizerConfig, grad_scaler: Optional[MegatronGradScaler],
                 stats: GradStatsContext, names: Dict[torch.nn.Parameter, str]):
        super().__init__(optimizer_factory(param_groups), config, grad_scaler, stats, names)
        self._entries = [(p, p) for g in param_groups for p in g["params"]]

    def _copy_model_grads_to_main_grads(self) -> None:
        for param, _ in self._entries:
            param.grad = _model_grad(param)

    def _copy_main_params_to_model_params(self) -> None:
        pass  # the model params are the main params

    def reload_model_params(self) -> None:
        pass


class Float16OptimizerWithFloat16Params(MegatronOptimizer):
    """fp16/bf16 model params with fp32 main copies (fp32 params are used directly).

    Args: as :class:`FP32Optimizer`.
    """

    def __init__(self, param_groups: List[dict], optimizer_factory: OptimizerFactory,
                 config: OptimizerConfig, grad_scaler: Optional[MegatronGradScaler],
                 stats: GradStatsContext, names: Dict[torch.nn.Parameter, str]):
        entries, main_groups = [], []
        for group in param_groups:
            mains = []
            for param in group["params"]:
                main = param.detach().clone().float() if param.dtype in _HALF else param
                entries.append((param, main))
                mains.append(main)
            main_groups.append({**group, "params": mains})
        super().__init__(optimizer_factory(main_groups), config, grad_scaler, stats, names)
        self._entries = entries

    def _copy_model_grads_to_main_grads(self) -> None:
        for model, main in self._entries:
            grad = _model_grad(model)
            main.grad = None if grad is None else (grad if main is model else grad.float())

    def _copy_main_params_to_model_params(self) -> None:
        for model, main in self._entries:
            if main is not model:
                model.data.copy_(main)

    def reload_model_params(self) -> None:
        for model, main in self._entries:
            if main is not model:
                main.data.copy_(model.data)


class ChainedOptimizer:
    """Several optimizers stepped together with one global norm and one skip decision.

    ``param_groups`` concatenates the members' groups (so one param scheduler drives
    them all); the loss scale is the first member's (all members' scalers see the same
    overflow flags and stay equal).
    """

    def __init__(self, chained_optimizers: List[MegatronOptimizer]):
        if not chained_optimizers:
            raise ValueError("ChainedOptimizer needs at least one optimizer")
        self.chained_optimizers = chained_optimizers
        self.config = chained_optimizers[0].config

    @property
    def param_groups(self) -> List[dict]:
        return [g for opt in self.chained_optimizers for g in opt.param_groups]

    def get_parameters(self) -> List[torch.Tensor]:
        return [p for opt in self.chained_optimizers for p in opt.get_parameters()]

    def get_loss_scale(self) -> torch.Tensor:
        return self.chained_optimizers[0].get_loss_scale()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.chained_optimizers[0].scale_loss(loss)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.chained_optimizers:
            opt.zero_grad(set_to_none)

    def reload_model_params(self) -> None:
        for opt in self.chained_optimizers:
            opt.reload_model_params()

    @torch.no_grad()
    def step(self) -> Tuple[bool, Optional[float], Optional[int]]:
        return _step_optimizers(self.chained_optimizers, self.config)

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.chained_optimizers]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved = state_dict["optimizers"]
        if len(saved) != len(self.chained_optimizers):
            raise ValueError(f"state dict holds {len(saved)} optimizers, expected "
                             f"{len(self.chained_optimizers)}")
        for opt, sd in zip(self.chained_optimizers, saved):
            opt.load_state_dict(sd)
