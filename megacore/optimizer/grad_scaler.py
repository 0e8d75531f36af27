"""Loss scalers for fp16 training.

fp16 gradients underflow to zero below ~6e-8, so the loss is multiplied by a large
scale before backward and the grads divided by it before the step. A constant scale
needs tuning; the dynamic scaler finds the largest safe one: it backs off when a step
produced Inf/NaN grads (the step is skipped) and grows again after ``growth_interval``
clean steps. ``hysteresis`` tolerates that many overflowing steps before backing off.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

__all__ = ["MegatronGradScaler", "ConstantGradScaler", "DynamicGradScaler"]


class MegatronGradScaler:
    """Base: holds ``scale`` (a 1-element fp32 tensor) and its inverse."""

    def __init__(self, initial_scale: float):
        if initial_scale <= 0.0:
            raise ValueError(f"initial loss scale must be positive, got {initial_scale}")
        self._scale = torch.tensor([float(initial_scale)], dtype=torch.float32)

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        return self._scale.double().reciprocal().float()

    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step (``found_inf``: the grads overflowed)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self._scale.clone()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._scale = state_dict["scale"].clone().to(torch.float32)


class ConstantGradScaler(MegatronGradScaler):
    """A fixed loss scale (``OptimizerConfig.loss_scale``)."""

    def update(self, found_inf: bool) -> None:
        pass


class DynamicGradScaler(MegatronGradScaler):
    """Back off on overflow, grow after ``growth_interval`` clean steps.

    Args:
        initial_scale: starting scale (e.g. 2**32).
        min_scale: never back off below this.
        growth_factor: multiply the scale by this after ``growth_interval`` clean steps.
        backoff_factor: multiply by this (< 1) once ``hysteresis`` overflows accumulated.
        growth_interval: clean steps before growing (``loss_scale_window``).
        hysteresis: overflowing steps tolerated before backing off; reset on growth.
    """

    def __init__(self, initial_scale: float, min_scale: float, growth_factor: float,
                 backoff_factor: float, growth_interval: int, hysteresis: int):
        super().__init__(initial_scale)
        if not 0.0 < min_scale <= initial_scale:
            raise ValueError(f"min_scale must be in (0, initial_scale], got {min_scale}")
        if growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError("growth_interval and hysteresis must be >= 1, got "
                             f"{growth_interval} and {hysteresis}")
        self.min_scale = torch.tensor([float(min_scale)], dtype=torch.float32)
        self.growth_factor = torch.tensor([float(growth_factor)], dtype=torch.float32)
        self.backoff_factor = torch.tensor([float(backoff_factor)], dtype=torch.float32)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = torch.max(self._scale * self.backoff_factor, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self._scale = self._scale * self.growth_factor

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self._scale.clone(), "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._hysteresis_tracker = int(state_dict["hysteresis_tracker"])
