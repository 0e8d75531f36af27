"""The output side of preprocessing and merging: check the prefix before any work, and
remove the temporary files a killed earlier run left behind.

Outputs are written as ``{final}.tmp-{pid}`` and renamed when complete (see
``IndexedDatasetBuilder``), so a run killed by SIGKILL or a power cut leaves such files,
possibly of many MB. The next run to the same prefix removes them, but only those whose
writer process is gone: a run still writing to the same prefix keeps its files.
"""

from __future__ import annotations

import errno
import glob
import os
import re
from typing import Iterable, List

from megacore.datasets.preprocess.problems import PreprocessError

_TEMPORARY = re.compile(r"\.tmp-(\d+)$")


def check_output_prefix(paths: Iterable[str]) -> None:
    """Create the directory of the output ``paths`` and check they can be written.

    Raises:
        PreprocessError: one line naming the path that is in the way and why.
    """
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise PreprocessError(f"{directory}: cannot create the output directory: a "
                                  f"file is in the way (check --output-prefix)") from None
        except OSError as err:
            raise PreprocessError(f"{err.filename or directory}: cannot create the output "
                                  f"directory ({err.strerror})") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PreprocessError(f"{directory}: output directory is not writable")
        if os.path.isdir(path):
            raise PreprocessError(f"{path}: output path is a directory")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM  # exists, owned by someone else
    return True


def remove_stale_temporaries(paths: Iterable[str], log=None) -> List[str]:
    """Remove ``{path}.tmp-{pid}`` files of ``paths`` whose process ``pid`` is gone;
    returns the removed files (each is reported to ``log``)."""
    removed = []
    for path in paths:
        for candidate in sorted(glob.glob(glob.escape(path) + ".tmp-*")):
            match = _TEMPORARY.search(candidate)
            if not match:
                continue
            pid = int(match.group(1))
            if pid == os.getpid() or _process_exists(pid):
                continue
            try:
                size = os.path.getsize(candidate)
                os.remove(candidate)
            except FileNotFoundError:
                continue  # another run cleaned it first
            except OSError as err:
                raise PreprocessError(f"{candidate}: cannot remove a stale temporary file "
                                      f"of an earlier run ({err.strerror})") from None
            removed.append(candidate)
            if log is not None:
                print(f"removed {candidate} ({size:,} bytes), left by an earlier run "
                      f"(process {pid}) that did not finish", file=log, flush=True)
    return removed
