"""Module spec of an MoE layer, for transformer layer specs.

A GPT layer spec puts ``get_moe_module_spec()`` in ``TransformerLayerSubmodules.mlp`` for the
layers that ``moe_layer_freq`` marks (``moe_config.is_moe_layer``) and the dense MLP spec for
the others.
"""

from __future__ import annotations

from megacore.transformer.moe.moe_layer import MoELayer, get_moe_submodules
from megacore.transformer.spec_utils import ModuleSpec

__all__ = ["get_moe_module_spec"]


def get_moe_module_spec(moe_grouped_gemm: bool = False) -> ModuleSpec:
    """``MoELayer`` built from :func:`~megacore.transformer.moe.moe_layer.get_moe_submodules`."""
    return ModuleSpec(module=MoELayer, submodules=get_moe_submodules(moe_grouped_gemm))
