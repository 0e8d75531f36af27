"""The error a config dataclass raises for a bad value, naming the fields involved.

A config's ``__post_init__`` checks its own fields (STYLE.md); when a value is wrong it
raises :class:`FieldError` with the message and the names of the fields it is
about. A program that set those fields from its own flags (the Megatron-style command
line in ``megacore.training``) names its flags from ``fields`` instead of parsing the
message. It is a ``ValueError``, so callers catching ``ValueError`` keep working.
"""

from __future__ import annotations

from typing import Tuple

__all__ = ["FieldError"]


class FieldError(ValueError):
    """A config value rejected by its dataclass; ``fields`` names the fields involved.

    Example::

        raise FieldError(f"clip_grad must be >= 0, got {self.clip_grad}", "clip_grad")
    """

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields: Tuple[str, ...] = fields
