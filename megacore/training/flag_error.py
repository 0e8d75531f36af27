"""The errors of a bad command line, carrying the flags they are about as data.

:class:`ArgumentValidationError` is an inconsistent combination of flags; its message
names them. :class:`FlagError` (a subclass) also carries ``flags``, the flags involved, set
where the error is raised, so a program can tell which flags to fix without reading the
message; the ``error:`` line that :mod:`megacore.training.cli` prints lists them when the
message speaks of config fields instead (no flag is ever recovered from message text).
"""

from __future__ import annotations

from typing import Optional, Tuple

__all__ = ["ArgumentValidationError", "FlagError"]


class ArgumentValidationError(ValueError):
    """An inconsistent combination of flags; the message names them."""


class FlagError(ArgumentValidationError):
    """A bad flag value or combination, with the flags involved as data.

    ``flags``: every flag the error is about, in the order named (e.g.
    ``("--save-interval", "--save")``); ``flag`` is the first, the one to change.
    ``named``: whether the message names the flags itself; when False (an error raised by
    a config dataclass, which speaks of its fields), ``str()`` lists them after it:
    ``invalid optimizer settings: clip_grad must be >= 0 ... [flags: --clip-grad]``.
    """

    def __init__(self, message: str, *flags: str, named: bool = True):
        super().__init__(message)
        self.message = message
        self.flags: Tuple[str, ...] = flags
        self.named = named

    @property
    def flag(self) -> Optional[str]:
        return self.flags[0] if self.flags else None

    def __str__(self) -> str:
        if self.named or not self.flags:
            return self.message
        return f"{self.message} [flags: {', '.join(self.flags)}]"
