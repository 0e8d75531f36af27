"""What a launcher (``torchrun``, SLURM through torchrun) tells a rank, and what it reads
back when the rank fails.

Both are read from the environment, so they work before any process group exists (an
argument error ends a rank before ``init_process_group``).
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["is_launch_rank_zero", "record_for_launcher"]


def is_launch_rank_zero() -> bool:
    """True unless a launcher made this process a rank other than 0."""
    return os.environ.get("RANK", "0") == "0"


def record_for_launcher(message: str) -> None:
    """Write ``message`` as this rank's failure for ``torchrun``'s failure report.

    ``torchrun`` names a file per rank in ``TORCHELASTIC_ERROR_FILE`` and prints the first
    failure it finds there as the report's root cause (a plain-string message is shown as
    is); without one the report says only "To enable traceback see ...". Does nothing
    outside ``torchrun``."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"message": message, "timestamp": str(int(time.time()))}, f)
