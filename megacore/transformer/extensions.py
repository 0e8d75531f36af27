"""Optional accelerated kernels (NVIDIA Apex, Transformer Engine): the one guarded import.

Nothing else in megacore imports Apex or Transformer Engine. Their absence is never an
error: ``HAVE_APEX`` / ``HAVE_TE`` say what is there, and the spec helpers in
``megacore.models.gpt.gpt_layer_specs`` pick these modules only when they are importable
and the run is on CUDA. (The PyPI package named ``apex`` is an unrelated web toolkit; we
probe ``apex.normalization``, which only NVIDIA Apex has.)
"""

from __future__ import annotations

import torch

from megacore import device
from megacore.transformer.transformer_config import TransformerConfig

try:  # the guarded imports
    from apex.normalization.fused_layer_norm import (
        FusedLayerNorm as _ApexFusedLayerNorm,
    )
    HAVE_APEX = True
except Exception:  # noqa: BLE001 - absent, or a broken build: either way unusable
    HAVE_APEX = False

try:
    import transformer_engine.pytorch as _te
    HAVE_TE = True
except Exception:  # noqa: BLE001
    HAVE_TE = False

__all__ = ["HAVE_APEX", "HAVE_TE", "apex_usable", "te_usable", "FusedLayerNorm", "TENorm"]


def apex_usable() -> bool:
    """Apex's fused norm can run here (importable and on CUDA)."""
    return HAVE_APEX and device.device_type() == "cuda"


def te_usable() -> bool:
    """Transformer Engine modules can run here (importable and on CUDA)."""
    return HAVE_TE and device.device_type() == "cuda"


class FusedLayerNorm(torch.nn.Module):
    """Apex's fused LayerNorm; weights carry ``sequence_parallel`` like the torch norm.

    Raises:
        RuntimeError: Apex is not importable or the run is not on CUDA.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if not apex_usable():
            raise RuntimeError("FusedLayerNorm needs NVIDIA Apex on CUDA; use "
                               "megacore.transformer.torch_norm.LayerNorm instead")
        self.norm = _ApexFusedLayerNorm(hidden_size, eps=eps)
        for param in self.norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        # Zero-centered gamma (stored weight = gamma - 1): Apex's module has no such
        # mode, so those runs take torch's kernel with weight + 1.
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        if self.zero_centered_gamma:
            with torch.no_grad():
                self.norm.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_centered_gamma:
            return torch.nn.functional.layer_norm(x, self.norm.normalized_shape,
                                                  self.norm.weight + 1, self.norm.bias,
                                                  self.norm.eps)
        return self.norm(x)


class TENorm:
    """Transformer Engine's LayerNorm or RMSNorm (by ``config.normalization``).

    Raises:
        RuntimeError: Transformer Engine is not importable or the run is not on CUDA.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        if not te_usable():
            raise RuntimeError("TENorm needs Transformer Engine on CUDA; use "
                               "megacore.transformer.torch_norm.WrappedTorchNorm instead")
        norm_cls = _te.RMSNorm if config.normalization == "RMSNorm" else _te.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, sequence_parallel=config.sequence_parallel,
                        params_dtype=config.params_dtype,
                        zero_centered_gamma=config.layernorm_zero_centered_gamma)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
