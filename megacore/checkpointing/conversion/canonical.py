"""The interface between loaders and savers: a random-access store of canonical tensors.

A :class:`CanonicalSource` (megacore legacy or torch_dist, Hugging Face) exposes the
model's :class:`GPTDescription`, the canonical tensor names in module order
(the model's, ``tensor_rules``), optimizer fields per param, and ``read(keys)``, which
merges the physical shards of just those keys. Savers pull what they need, one layer (or
one target file) at a time, so no side holds the whole model. Keys are ``model/<name>`` and
``optimizer/<field>/<name>``.

``common`` carries what is not a tensor: iteration, consumed samples, scheduler state,
extra state and the optimizer's param groups (``optimizer_common``: ``{"dense": ...,
"expert": ...}``, each ``{"param_groups": {signature: group}, "grad_scaler": ...}``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import torch

from megacore.checkpointing.conversion.manifest import Manifest
from megacore.checkpointing.conversion.model_description import GPTDescription
from megacore.checkpointing.conversion.tensor_rules import (
    canonical_sort_key,
    layer_group,
    parse_key,
)

__all__ = ["CanonicalSource", "CommonState", "layer_batches"]


@dataclasses.dataclass
class CommonState:
    """Non-tensor state carried between megacore checkpoints (defaults for HF sources).

    Attributes:
        iteration: completed iterations.
        consumed_train_samples, consumed_valid_samples: data position.
        opt_param_scheduler: scheduler state dict or None.
        extra_state: the checkpoint's extra state.
        optimizer_common: ``{"dense"|"expert": {"param_groups": {sig: group},
            "grad_scaler": ...}}`` (empty without optimizer state).
    """

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    opt_param_scheduler: Optional[Dict[str, Any]] = None
    extra_state: Any = None
    optimizer_common: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)


class CanonicalSource:
    """Base of the loaders: subclasses fill ``description``, ``common``, ``_names``,
    ``_fields`` and implement ``_read``."""

    description: GPTDescription
    common: CommonState

    def __init__(self, manifest: Optional[Manifest] = None):
        self.manifest = manifest if manifest is not None else Manifest()
        self._names: List[str] = []
        self._fields: Dict[str, List[str]] = {}
        self.notes: List[str] = []
        """What the source holds that the conversion does not carry (reported)."""

    def model_names(self) -> List[str]:
        """Canonical model tensor names in module order."""
        return sorted(self._names, key=lambda n: canonical_sort_key(n, self.description))

    def optimizer_fields(self, name: str) -> List[str]:
        """Optimizer state fields saved for param ``name`` (empty: none)."""
        return self._fields.get(name, [])

    @property
    def has_optimizer(self) -> bool:
        return bool(self._fields)

    def read(self, keys: Sequence[str], consume: bool = True) -> Dict[str, torch.Tensor]:
        """The canonical tensors of ``keys`` (merged from their shards)."""
        out = self._read(list(keys))
        if consume:
            self.manifest.consume(keys)
        return out

    def _read(self, keys: List[str]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _register(self, key: str) -> None:
        field, name = parse_key(key)
        if field is None:
            if name not in self._names:
                self._names.append(name)
        else:
            fields = self._fields.setdefault(name, [])
            if field not in fields:
                fields.append(field)
        self.manifest.add_source(key)

    def close(self) -> None:
        """Release open files."""


def layer_batches(names: Sequence[str]) -> List[List[str]]:
    """Consecutive names grouped by layer (embedding and final parts on their own)."""
    batches: List[List[str]] = []
    last = None
    for name in names:
        group = layer_group(name)
        if group != last:
            batches.append([])
            last = group
        batches[-1].append(name)
    return batches
