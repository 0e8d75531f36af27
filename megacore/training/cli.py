"""How a command-line program ends: the result, or one ``error:`` line.

``sys.exit(run_program(main))`` runs a program's ``main``. An error the user can fix (a
bad flag combination, an unreadable checkpoint) ends it with exit status 2 and one line
``error: <what is wrong, naming the flag or file>`` instead of a traceback; under
``torchrun`` every rank hits the same error and only rank 0 prints it, so the user reads
one line, not one traceback per rank. ``torchrun`` then prints its own failure report,
which the program cannot silence; each rank writes its error line to the file torchrun
names in ``TORCHELASTIC_ERROR_FILE``, so that report's root cause is the same ``error:``
line instead of "To enable traceback see ...". Ctrl-C ends it with status 130 and no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from megacore.checkpointing import CheckpointError
from megacore.training.arguments import ArgumentValidationError
from megacore.training.launch_env import is_launch_rank_zero, record_for_launcher

__all__ = ["USER_ERRORS", "is_launch_rank_zero", "record_for_launcher", "run_program"]

USER_ERRORS = (ArgumentValidationError, CheckpointError)
"""Exceptions whose message is the whole story for the user."""


def run_program(main: Callable[[], Any]) -> int:
    """Run ``main()`` and return the process exit status (see the module docstring)."""
    try:
        result = main()
    except USER_ERRORS as err:
        if is_launch_rank_zero():
            print(f"error: {err}", file=sys.stderr, flush=True)
        record_for_launcher(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        if is_launch_rank_zero():
            print("interrupted", file=sys.stderr, flush=True)
        return 130
    return result if isinstance(result, int) else 0
