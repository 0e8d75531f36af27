"""The one exception type of :mod:`megacore.checkpointing`.

Every failure to find, read or match a checkpoint raises :class:`CheckpointError` with a
message that names the path involved and, where keys or layouts disagree, the keys and
layouts, so a user can act on it without reading the code.
"""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model being loaded."""
