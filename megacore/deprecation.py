"""Deprecations that warn with the version in which the name goes away.

Usage::

    @deprecated(since="0.2.0", removed_in="0.4.0", alternative="megacore.foo.bar")
    def old_bar(...): ...

Calling ``old_bar`` warns ``MegacoreDeprecationWarning`` (a ``FutureWarning``, so end users
see it by default, not only test runners). Decorating something whose ``removed_in`` is
not later than the current package version raises at import time: a deprecation that
outlived its announced removal fails the test suite instead of lingering.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, List, Optional, Sequence, TypeVar

from megacore.package_info import __version__

__all__ = ["MegacoreDeprecationWarning", "deprecated", "warn_deprecated", "parse_version",
           "DeprecatedFlag", "MIN_MINOR_VERSIONS", "rename_deprecated_flags"]

F = TypeVar("F", bound=Callable)


class MegacoreDeprecationWarning(FutureWarning):
    """A public name or argument of megacore is deprecated."""


def parse_version(version: str) -> tuple:
    """``"1.2.3rc1"`` -> ``(1, 2, 3)`` (pre-release suffixes are ignored)."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def _message(what: str, since: str, removed_in: str, alternative: Optional[str]) -> str:
    text = f"{what} is deprecated since megacore {since} and will be removed in {removed_in}"
    return text + (f"; use {alternative} instead" if alternative else "")


def warn_deprecated(what: str, *, since: str, removed_in: str,
                    alternative: Optional[str] = None, stacklevel: int = 3) -> None:
    """Warn that ``what`` (a name or an argument) is deprecated."""
    warnings.warn(_message(what, since, removed_in, alternative), MegacoreDeprecationWarning,
                  stacklevel=stacklevel)


def deprecated(*, since: str, removed_in: str, alternative: Optional[str] = None,
               current_version: str = __version__) -> Callable[[F], F]:
    """Decorate a function or class so that using it warns; see the module docstring."""
    if parse_version(removed_in) <= parse_version(current_version):
        raise RuntimeError(f"deprecated name scheduled for removal in {removed_in} still "
                           f"exists in megacore {current_version}: remove it")
    if parse_version(removed_in) <= parse_version(since):
        raise ValueError(f"removed_in ({removed_in}) must be later than since ({since})")

    def decorate(obj: F) -> F:
        what = getattr(obj, "__qualname__", repr(obj))
        note = _message(what, since, removed_in, alternative)
        if isinstance(obj, type):
            original_init = obj.__init__

            @functools.wraps(original_init)
            def init(self, *args, **kwargs):
                warn_deprecated(what, since=since, removed_in=removed_in,
                                alternative=alternative)
                original_init(self, *args, **kwargs)

            obj.__init__ = init
            obj.__doc__ = f"Deprecated: {note}.\n\n{obj.__doc__ or ''}"
            return obj

        @functools.wraps(obj)
        def wrapper(*args, **kwargs):
            warn_deprecated(what, since=since, removed_in=removed_in, alternative=alternative)
            return obj(*args, **kwargs)

        wrapper.__doc__ = f"Deprecated: {note}.\n\n{obj.__doc__ or ''}"
        return wrapper  # type: ignore[return-value]

    return decorate


# -- command-line flags and config fields ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DeprecatedFlag:
    """A renamed or removed flag that keeps working until ``removed_in``.

    ``replacement`` is the flag that now carries the setting (same type and meaning).
    The policy: a flag keeps working for at least two minor versions after ``since``
    (:data:`MIN_MINOR_VERSIONS`), and a row whose ``removed_in`` has been reached fails
    loudly instead of lingering.
    """

    flag: str
    replacement: str
    since: str
    removed_in: str

    def check_policy(self, current_version: str = __version__) -> None:
        since, removed = parse_version(self.since), parse_version(self.removed_in)
        if removed[0] == since[0] and removed[1] - since[1] < MIN_MINOR_VERSIONS:
            raise ValueError(f"deprecated flag {self.flag}: removed_in {self.removed_in} must "
                             f"be at least {MIN_MINOR_VERSIONS} minor versions after "
                             f"{self.since}")
        if removed <= since:
            raise ValueError(f"deprecated flag {self.flag}: removed_in {self.removed_in} must "
                             f"be later than since {self.since}")
        if removed <= parse_version(current_version):
            raise RuntimeError(f"deprecated flag {self.flag} scheduled for removal in "
                               f"{self.removed_in} still exists in megacore "
                               f"{current_version}: remove it")


MIN_MINOR_VERSIONS = 2
"""A deprecated flag or config field keeps working for at least this many minor versions."""


def rename_deprecated_flags(argv: Sequence[str], table: Sequence[DeprecatedFlag],
                            current_version: str = __version__) -> List[str]:
    """``argv`` with every deprecated flag replaced by its replacement, warning once each.

    Both ``--old value`` and ``--old=value`` are handled; anything else (including an
    unknown flag) is left for the parser to accept or reject.
    """
    by_flag = {row.flag: row for row in table}
    out: List[str] = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        row = by_flag.get(name) if name.startswith("--") else None
        if row is None:
            out.append(arg)
            continue
        row.check_policy(current_version)
        warn_deprecated(f"flag {row.flag}", since=row.since, removed_in=row.removed_in,
                        alternative=row.replacement, stacklevel=2)
        out.append(row.replacement + sep + value)
    return out
