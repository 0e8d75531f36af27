"""``OptimizerParamScheduler``: learning-rate and weight-decay schedules (Megatron's).

Learning rate at step ``n`` (per param group, whose ``max_lr``/``min_lr`` override the
scheduler's; the result is multiplied by the group's ``lr_mult``):

    warmup   n <= W (W > 0):    init_lr + (max_lr - init_lr) * n / W
    constant                    max_lr
    n > D (decay steps):        min_lr
    inverse-square-root         max(min_lr, max_lr * sqrt(max(W, 1)) / sqrt(max(n, 1)))
    otherwise, r = (n - W) / (D - W) and lr = min_lr + c * (max_lr - min_lr) with
      linear   c = 1 - r
      cosine   c = (1 + cos(pi r)) / 2
      WSD      c = 1 until the last ``wsd_decay_steps`` of D, then with
               q = (n - (D - wsd_decay_steps)) / wsd_decay_steps:
               linear 1 - q, cosine (1 + cos(pi q)) / 2, exponential 2 * 0.5^q - 1,
               minus_sqrt 1 - sqrt(q)

Weight decay at step ``n`` (times the group's ``wd_mult``): ``end_wd`` once n exceeds
``wd_incr_steps``; else ``start_wd + c * (end_wd - start_wd)`` with r = n / wd_incr_steps,
linear c = r, cosine c = (1 + cos(pi (1 - r))) / 2, constant (start_wd == end_wd).

Checkpoints: ``state_dict`` records the schedule and ``num_steps``. On load, a value that
differs from the current one is taken from the checkpoint
(``use_checkpoint_opt_param_scheduler``), or the current one is kept
(``override_opt_param_scheduler``), or it is an error: never a silent mix.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

__all__ = ["OptimizerParamScheduler"]

_LR_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
_WSD_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
_WD_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    """Sets ``lr`` and ``weight_decay`` of every param group on each :meth:`step`.

    Args (Megatron's): optimizer (anything with ``param_groups``), init_lr, max_lr,
    min_lr, lr_warmup_steps, lr_decay_steps, lr_decay_style, start_wd, end_wd,
    wd_incr_steps, wd_incr_style, use_checkpoint_opt_param_scheduler,
    override_opt_param_scheduler, wsd_decay_steps, lr_wsd_decay_style; see the module
    docstring for the formulas.
    """

    def __init__(self, optimizer, init_lr: float, max_lr: float, min_lr: float,
                 lr_warmup_steps: int, lr_decay_steps: int, lr_decay_style: str,
                 start_wd: float, end_wd: float, wd_incr_steps: int, wd_incr_style: str,
                 use_checkpoint_opt_param_scheduler: Optional[bool] = True,
                 override_opt_param_scheduler: Optional[bool] = False,
                 wsd_decay_steps: Optional[int] = None,
                 lr_wsd_decay_style: Optional[str] = None):
        self.optimizer = optimizer
        self.init_lr, self.max_lr, self.min_lr = init_lr, float(max_lr), min_lr
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps, self.lr_wsd_decay_style = wsd_decay_steps, lr_wsd_decay_style
        self.start_wd, self.end_wd = start_wd, end_wd
        self.wd_incr_steps, self.wd_incr_style = wd_incr_steps, wd_incr_style
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.num_steps = 0
        self._validate()
        self.step(0)

    def _validate(self) -> None:
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={self.min_lr}, "
                             f"max_lr={self.max_lr}")
        if self.lr_decay_steps <= 0 or self.lr_warmup_steps < 0:
            raise ValueError("lr_decay_steps must be > 0 and lr_warmup_steps >= 0, got "
                             f"{self.lr_decay_steps} and {self.lr_warmup_steps}")
        if self.lr_warmup_steps >= self.lr_decay_steps and self.lr_decay_style != "constant":
            raise ValueError(f"lr_warmup_steps ({self.lr_warmup_steps}) must be smaller than "
                             f"lr_decay_steps ({self.lr_decay_steps})")
        if self.lr_decay_style not in _LR_STYLES:
            raise ValueError(f"lr_decay_style must be one of {_LR_STYLES}, "
                             f"got {self.lr_decay_style!r}")
        if self.lr_decay_style == "WSD":
            if self.lr_wsd_decay_style not in _WSD_STYLES:
                raise ValueError(f"lr_wsd_decay_style must be one of {_WSD_STYLES} for WSD, "
                                 f"got {self.lr_wsd_decay_style!r}")
            if not self.wsd_decay_steps or not 0 < self.wsd_decay_steps <= self.lr_decay_steps:
                raise ValueError("wsd_decay_steps must be in (0, lr_decay_steps] for WSD, got "
                                 f"{self.wsd_decay_steps}")
        if self.wd_incr_style not in _WD_STYLES:
            raise ValueError(f"wd_incr_style must be one of {_WD_STYLES}, "
                             f"got {self.wd_incr_style!r}")
        if self.wd_incr_style == "constant" and self.start_wd != self.end_wd:
            raise ValueError("wd_incr_style='constant' needs start_wd == end_wd, got "
                             f"{self.start_wd} and {self.end_wd}")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("override_opt_param_scheduler and "
                             "use_checkpoint_opt_param_scheduler are mutually exclusive")

    # -- schedules ---------------------------------------------------------------------
    def get_wd(self) -> float:
        """Weight decay at the current step."""
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        ratio = float(self.num_steps) / float(self.wd_incr_steps)
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self, param_group: Dict[str, Any]) -> float:
        """Learning rate of ``param_group`` at the current step (before ``lr_mult``)."""
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        n, warmup = self.num_steps, self.lr_warmup_steps
        if warmup > 0 and n <= warmup:
            return self.init_lr + (max_lr - self.init_lr) * float(n) / float(warmup)
        if self.lr_decay_style == "constant":
            return max_lr
        if n > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            return max(min_lr, max_lr * max(warmup, 1) ** 0.5 / max(n, 1) ** 0.5)
        ratio = float(n - warmup) / float(self.lr_decay_steps - warmup)
        return min_lr + self._decay_coeff(ratio) * (max_lr - min_lr)

    def _decay_coeff(self, ratio: float) -> float:
        if self.lr_decay_style == "linear":
            return 1.0 - ratio
        if self.lr_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * ratio) + 1.0)
        anneal_start = self.lr_decay_steps - self.wsd_decay_steps  # WSD
        if self.num_steps <= anneal_start:
            return 1.0
        q = float(self.num_steps - anneal_start) / float(self.wsd_decay_steps)
        return {"linear": lambda: 1.0 - q,
                "cosine": lambda: 0.5 * (math.cos(math.pi * q) + 1.0),
                "exponential": lambda: 2.0 * math.pow(0.5, q) - 1.0,
                "minus_sqrt": lambda: 1.0 - math.sqrt(q)}[self.lr_wsd_decay_style]()

    def step(self, increment: int) -> None:
        """Advance ``increment`` steps and write lr / weight decay into the groups."""
        self.num_steps += increment
        new_wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = new_wd * group.get("wd_mult", 1.0)

    # -- checkpoints -------------------------------------------------------------------
    _SAVED = ("max_lr", "lr_warmup_steps", "num_steps", "lr_decay_style", "lr_decay_steps",
              "min_lr", "start_wd", "end_wd", "wd_incr_style", "wd_incr_steps")

    def state_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self._SAVED}

    def _check_and_set(self, name: str, saved: Any) -> Any:
        current = getattr(self, name)
        if self.override_opt_param_scheduler or saved == current:
            return current
        if self.use_checkpoint_opt_param_scheduler:
            return saved
        raise ValueError(f"optimizer param scheduler: {name} is {current} but the checkpoint "
                         f"has {saved}; set use_checkpoint_opt_param_scheduler to take the "
                         "checkpoint's value or override_opt_param_scheduler to keep yours")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the schedule (see the module docstring for conflicts) and the step."""
        for name in self._SAVED:
            if name != "num_steps" and name in state_dict:
                setattr(self, name, self._check_and_set(name, state_dict[name]))
        self._validate()
        self.num_steps = 0
        self.step(int(state_dict["num_steps"]))
