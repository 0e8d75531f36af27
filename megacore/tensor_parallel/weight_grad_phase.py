"""Which half of a split backward pass is running: input gradients (B) or weight gradients (W).

Zero-bubble pipeline schedules (:mod:`megacore.pipeline_parallel.backward_split`) run a
layer's backward in two steps: **B** computes the gradient of the stage's input (needed
at once by the previous stage) and **W** the gradients of the weights (needed only by the
optimizer, so it can fill pipeline bubbles). PyTorch's own backward nodes skip the
outputs nobody asked for, but a custom autograd function computes everything it
returns; the tensor-parallel linear function reads :func:`current_phase` to do only its
half: in B the input gradient and its tp collective, in W the weight (and bias) gradient.

Outside a split backward the phase is ``None`` and every function computes both. The
phase is process-wide, not per thread: autograd runs CUDA backwards on its own device
threads, which a thread-local would not reach (one backward runs at a time per process).
Activation recompute runs its inner backward with the phase cleared, so a recomputed
region computes all its gradients in B.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

__all__ = ["INPUT_GRAD", "WEIGHT_GRAD", "current_phase", "weight_grad_phase"]

INPUT_GRAD = "input"
WEIGHT_GRAD = "weight"

_phase: Optional[str] = None


def current_phase() -> Optional[str]:
    """``INPUT_GRAD``, ``WEIGHT_GRAD`` or ``None`` (a whole backward)."""
    return _phase


@contextlib.contextmanager
def weight_grad_phase(phase: Optional[str]) -> Iterator[None]:
    """Run the enclosed backward computing only ``phase``'s gradients (None: all)."""
    if phase not in (None, INPUT_GRAD, WEIGHT_GRAD):
        raise ValueError(f"phase must be None, {INPUT_GRAD!r} or {WEIGHT_GRAD!r}, got {phase!r}")
    global _phase
    previous, _phase = _phase, phase
    try:
        yield
    finally:
        _phase = previous
