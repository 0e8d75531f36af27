"""Module specs: which class implements each part of a layer, chosen without editing it.

A :class:`ModuleSpec` names a module class (or a function, or an import path) plus fixed
constructor kwargs and a ``submodules`` dataclass for the parts inside it. Layers build
their parts with :func:`build_module`, so swapping torch's LayerNorm for Apex's, or the
local linear layers for Transformer Engine's, is a different spec and no ``if`` in the
layer. Same surface as Megatron-Core's ``spec_utils``.

Example::

    spec = ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    mlp = build_module(spec, config=config)
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Any, Tuple, Union

import torch

__all__ = ["ModuleSpec", "build_module", "import_module", "get_submodules",
           "IdentityOp", "IdentityFuncOp"]


@dataclasses.dataclass
class ModuleSpec:
    """A module to build later.

    Attributes:
        module: the class or function, or ``(module_path, name)`` to import it lazily.
        params: kwargs always passed to the constructor (the caller's kwargs win).
        submodules: a dataclass of specs for the parts (passed as ``submodules=``).
    """

    module: Union[type, types.FunctionType, Tuple[str, str]]
    params: dict = dataclasses.field(default_factory=dict)
    submodules: Any = None


def import_module(module_path: Tuple[str, str]):
    """Import ``name`` from ``module_path`` given as ``(module_path, name)``."""
    path, name = module_path
    return getattr(importlib.import_module(path), name)


def get_submodules(spec_or_module):
    """The ``submodules`` of a spec (or ``None`` for a plain class)."""
    if isinstance(spec_or_module, ModuleSpec):
        return spec_or_module.submodules
    return None


def build_module(spec_or_module, *args, **kwargs):
    """Instantiate ``spec_or_module`` with ``args``/``kwargs``.

    A plain class is called directly; a ``ModuleSpec`` merges ``params`` under the
    caller's kwargs and passes ``submodules`` when set. A spec whose module is a function
    (e.g. a functional op like ``torch.nn.functional.gelu``) returns the function itself,
    uncalled, as Megatron does. ``None`` builds ``None`` (an absent part).
    """
    if spec_or_module is None:
        return None
    if isinstance(spec_or_module, types.FunctionType):
        return spec_or_module
    if not isinstance(spec_or_module, ModuleSpec):
        return spec_or_module(*args, **kwargs)
    module = spec_or_module.module
    if isinstance(module, tuple):
        module = import_module(module)
    if isinstance(module, types.FunctionType):
        return module
    merged = dict(spec_or_module.params)
    merged.update(kwargs)
    if spec_or_module.submodules is not None:
        merged["submodules"] = spec_or_module.submodules
    try:
        return module(*args, **merged)
    except TypeError as e:
        raise TypeError(f"building {module.__name__} from its spec failed: {e}") from e


class IdentityOp(torch.nn.Module):
    """Returns its first input; stands in for an absent part (e.g. no qk norm)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x, *args, **kwargs):
        return x


class IdentityFuncOp(IdentityOp):
    """Returns a function that returns its first input (for parts that are functions)."""

    def forward(self, *args, **kwargs):
        return super().forward
