"""LayerNorm and RMSNorm from ``torch.nn``, taking the transformer config.

Norm weights are replicated over tp. Under sequence parallelism each rank normalizes only
its ``[s/tp, b, h]`` slice, so its weight gradient is partial: the weights carry
``sequence_parallel=True`` and ``finalize_model_grads`` all-reduces them over tp
(Megatron's convention).
"""

from __future__ import annotations

import torch

from megacore import device
from megacore.transformer.transformer_config import TransformerConfig

__all__ = ["LayerNorm", "RMSNorm", "WrappedTorchNorm"]


def _mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel


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


class WrappedTorchNorm:
    """Builds :class:`LayerNorm` or :class:`RMSNorm` according to ``config.normalization``.

    Use it in specs when the norm kind should follow the config rather than the spec.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        norm_cls = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
        return norm_cls(config, hidden_size, eps)
