"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target.

A reader sees either the old file or the complete new one, never a torn write: POSIX
``os.replace`` within one directory is atomic, and the fsync before it makes sure the
renamed file's bytes are on disk (the fsync of the directory after it makes the rename
itself durable). Every file megacore's checkpointing writes goes through
:func:`atomic_write`, and the tracker file (``latest_checkpointed_iteration.txt``) is
written last, so a crash at any point of a save leaves the previous checkpoint as the
latest loadable one.

Tests inject failures by monkeypatching :func:`replace_file` (or ``torch.save``).
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Callable

import torch

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_torch_save", "replace_file",
           "fsync_directory"]


def fsync_directory(path: str) -> None:
    """Make renames inside directory ``path`` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_file(src: str, dst: str) -> None:
    """``os.replace`` (a separate function so tests can inject a crash right here)."""
    os.replace(src, dst)


def atomic_write(path: str, write_fn: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` atomically: ``write_fn(f)`` fills a temp file in the same directory,
    which is fsynced and renamed to ``path``. On any error the temp file is removed and
    ``path`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str) -> None:
    """Atomically ``torch.save(obj)`` to ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))
