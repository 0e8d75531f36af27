"""The errors of a bad command line, carrying the flags they are about as data.

:class:`ArgumentValidationError` is an inconsistent combination of flags; its message
names them. :class:`FlagError` (a subclass) also carries ``flags``, the flags involved, set
where the error is raised, so a program can tell which flags to fix without reading the
message. The one-line printer of :mod:`megacore.training.cli` uses them.
"""

from __future__ import annotations

from typing import Optional, Tuple

__all__ = ["ArgumentValidationError", "FlagError"]


class ArgumentValidationError(ValueError):
    """An inconsistent combination of flags; the message names them."""


class FlagError(ArgumentValidationError):
    """A bad flag value or combination, with the flags involved as data.

    ``flags``: every flag the message is about, in the order named (e.g.
    ``("--save-interval", "--save")``); ``flag`` is the first, the one to change.
    """

    def __init__(self, message: str, *flags: str):
        super().__init__(message)
        self.flags: Tuple[str, ...] = flags

    @property
    def flag(self) -> Optional[str]:
        return self.flags[0] if self.flags else None
