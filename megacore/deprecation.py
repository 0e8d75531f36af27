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

import functools
import warnings
from typing import Callable, Optional, TypeVar

from megacore.package_info import __version__

__all__ = ["MegacoreDeprecationWarning", "deprecated", "warn_deprecated", "parse_version"]

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
