"""Key/value cache state for incremental decoding.

``StaticInferenceContext`` holds, per layer, preallocated key and value buffers
``[max_sequence_length, max_batch_size, ng/tp, hn]``. A forward pass with it writes the
new tokens' keys and values at ``sequence_len_offset`` and attends over everything cached
so far. The generation engine advances ``sequence_len_offset`` after each step.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch

__all__ = ["StaticInferenceContext"]


@dataclasses.dataclass
class StaticInferenceContext:
    """Decoding state shared by all layers of a model for one batch of requests."""

    max_batch_size: int
    """Rows of the key/value buffers."""

    max_sequence_length: int
    """Positions of the key/value buffers (prompt plus generated tokens)."""

    sequence_len_offset: int = 0
    """Position of the first token of the current forward pass."""

    batch_size_offset: int = 0
    """First batch row of the current forward pass."""

    key_value_memory_dict: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = \
        dataclasses.field(default_factory=dict)
    """layer number -> (key buffer, value buffer), allocated on first use."""

    def reset(self) -> None:
        """Start a new batch: positions restart at 0 (buffers are reused)."""
        self.sequence_len_offset = 0
        self.batch_size_offset = 0

    def append_key_value(self, layer_number: int, key: torch.Tensor,
                         value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` ``[s, b, ng/tp, hn]`` at the current offsets; return the
        cached keys/values of positions ``0 .. offset + s - 1`` for these rows."""
        if layer_number not in self.key_value_memory_dict:
            # Key and value may differ in width (multi-latent attention caches its latent
            # and rotary key here).
            rows = (self.max_sequence_length, self.max_batch_size)
            self.key_value_memory_dict[layer_number] = (
                torch.empty(rows + tuple(key.shape[2:]), dtype=key.dtype, device=key.device),
                torch.empty(rows + tuple(value.shape[2:]), dtype=value.dtype,
                            device=value.device))
        key_cache, value_cache = self.key_value_memory_dict[layer_number]
        s0, b0 = self.sequence_len_offset, self.batch_size_offset
        s1, b1 = s0 + key.size(0), b0 + key.size(1)
        if s1 > self.max_sequence_length or b1 > self.max_batch_size:
            raise ValueError(f"KV cache overflow: positions up to {s1} and rows up to {b1} "
                             f"exceed max_sequence_length={self.max_sequence_length}, "
                             f"max_batch_size={self.max_batch_size}")
        key_cache[s0:s1, b0:b1] = key.detach()
        value_cache[s0:s1, b0:b1] = value.detach()
        return key_cache[:s1, b0:b1], value_cache[:s1, b0:b1]
