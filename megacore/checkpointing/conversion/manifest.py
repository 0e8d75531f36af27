"""The no-guessing check of a conversion: every source tensor used, every target written once.

Sources register each physical tensor they hold (``add_source``: its canonical key, or
``unknown`` when the name is not one the converter understands); savers ``plan`` every
target entry before writing and record each ``write``; reading a canonical key marks it
``consumed``. :meth:`Manifest.check` then stops the conversion, listing the names, when

* a source tensor has a name no mapping knows (unknown),
* a source tensor was never consumed by any target entry,
* a planned target entry was not written, or was written twice, or an unplanned one was.
"""

from __future__ import annotations

import collections
from typing import Iterable, List

from megacore.checkpointing.errors import CheckpointError

__all__ = ["Manifest", "ConversionError"]


class ConversionError(CheckpointError):
    """A conversion cannot proceed without guessing; the message lists the names."""


def _listing(title: str, names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = "\n".join(f"    {n}" for n in names[:limit])
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"  {title} ({len(names)}):\n{shown}{more}"


class Manifest:
    """Bookkeeping of source keys, consumed keys and target entries (see module doc)."""

    def __init__(self):
        self.source = set()
        self.unknown: List[str] = []
        self.consumed = set()
        self.planned = set()
        self.written = collections.Counter()

    def add_source(self, key: str) -> None:
        self.source.add(key)

    def add_unknown(self, description: str) -> None:
        self.unknown.append(description)

    def consume(self, keys: Iterable[str]) -> None:
        self.consumed.update(keys)

    def plan(self, target: str) -> None:
        if target in self.planned:
            raise ConversionError(f"target entry {target} planned twice")
        self.planned.add(target)

    def write(self, target: str) -> None:
        self.written[target] += 1

    def check_source(self) -> None:
        """Fail early (before writing anything) on names no mapping understands."""
        if self.unknown:
            raise ConversionError("the source holds tensors this converter does not know; "
                                  "nothing was converted:\n"
                                  + _listing("unknown source tensors", self.unknown))

    def check(self) -> None:
        """Raise :class:`ConversionError` listing every problem found."""
        problems = []
        if self.unknown:
            problems.append(_listing("unknown source tensors", self.unknown))
        unused = self.source - self.consumed
        if unused:
            problems.append(_listing("source tensors not consumed", unused))
        missing = self.planned - set(self.written)
        if missing:
            problems.append(_listing("target entries not written", missing))
        twice = [k for k, n in self.written.items() if n > 1]
        if twice:
            problems.append(_listing("target entries written more than once", twice))
        unplanned = set(self.written) - self.planned
        if unplanned:
            problems.append(_listing("target entries written without a plan", unplanned))
        if problems:
            raise ConversionError("conversion manifest check failed:\n" + "\n".join(problems))
