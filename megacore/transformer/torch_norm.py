"""LayerNorm and RMSNorm from ``torch.nn``, taking the transformer config.

Norm weights are replicated over tp. Under sequence parallelism each rank normalizes only
its ``[s/tp, b, h]`` slice, so its weight gradient is partial: the weights carry
``sequence_parallel=True`` and ``finalize_model_grads`` all-reduces them over tp
(Megatron's convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megacore import device
from megacore.transformer.transformer_config import TransformerConfig

__all__ = ["LayerNorm", "RMSNorm", "WrappedTorchNorm"]


def _mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel


def _zero_center(module: torch.nn.Module, config: TransformerConfig) -> bool:
    """``layernorm_zero_centered_gamma``: the stored weight is ``gamma - 1``, so it starts
    at 0 (the norm starts as the identity scale, as with gamma = 1)."""
    if config.layernorm_zero_centered_gamma:
        with torch.no_grad():
            module.weight.zero_()
    return config.layernorm_zero_centered_gamma


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` over the last dim ``h`` (weights marked for sequence parallel).

    Args:
        config: supplies ``params_dtype`` and ``sequence_parallel``.
        hidden_size: normalized width.
        eps: variance epsilon.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype,
                         device=device.current_device())
        _mark_sequence_parallel(self, config)
        self.zero_centered_gamma = _zero_center(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_centered_gamma:
            return super().forward(x)
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over the last dim ``h`` (weights marked for sequence parallel).

    Args:
        config: supplies ``params_dtype`` and ``sequence_parallel``.
        hidden_size: normalized width.
        eps: epsilon added to the mean square.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype,
                         device=device.current_device())
        _mark_sequence_parallel(self, config)
        self.zero_centered_gamma = _zero_center(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_centered_gamma:
            return super().forward(x)
        return F.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)


class WrappedTorchNorm:
    """Builds :class:`LayerNorm` or :class:`RMSNorm` according to ``config.normalization``.

    Use it in specs when the norm kind should follow the config rather than the spec.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        norm_cls = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
        return norm_cls(config, hidden_size, eps)
