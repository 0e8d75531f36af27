"""Named MLP activations that ``torch.nn.functional`` does not name.

A run configuration saves ``activation_func`` by its ``__name__`` (``gelu``, ``silu``), so
a checkpoint can say which function it was trained with; the tanh approximation of GeLU
(GPT-2's ``gelu_new``, Megatron's ``--openai-gelu``) needs a name of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["openai_gelu"]


def openai_gelu(x: torch.Tensor) -> torch.Tensor:
    """GeLU with the tanh approximation: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``
    (GPT-2's activation; Megatron's ``--openai-gelu``)."""
    return F.gelu(x, approximate="tanh")
