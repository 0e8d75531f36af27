"""How a command-line program ends: the result, or one ``error:`` line.

``sys.exit(run_program(main))`` runs a program's ``main``. An error the user can fix (a
bad flag combination, an unreadable checkpoint) ends it with exit status 2 and one line
``error: <what is wrong, naming the flag or file>`` instead of a traceback; under
``torchrun`` every rank hits the same error and only rank 0 prints it, so the user reads
one line, not one traceback per rank. Ctrl-C ends it with status 130 and no traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from megacore.checkpointing import CheckpointError
from megacore.training.flag_error import ArgumentValidationError

__all__ = ["USER_ERRORS", "is_launch_rank_zero", "run_program"]

USER_ERRORS = (ArgumentValidationError, CheckpointError)
"""Exceptions whose message is the whole story for the user."""


def is_launch_rank_zero() -> bool:
    """True unless a launcher (``torchrun``, SLURM via torchrun) made this a rank other
    than 0. Read from the environment: it must work before the process group exists."""
    return os.environ.get("RANK", "0") == "0"


def run_program(main: Callable[[], Any]) -> int:
    """Run ``main()`` and return the process exit status (see the module docstring)."""
    try:
        result = main()
    except USER_ERRORS as err:
        if is_launch_rank_zero():
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if is_launch_rank_zero():
            print("interrupted", file=sys.stderr, flush=True)
        return 130
    return result if isinstance(result, int) else 0
