"""Bounded-memory plumbing for converters: progress, peak memory, spilled tensors.

* :class:`Progress`: a tqdm bar when tqdm is installed, else a counter on stderr
  (or nothing, ``enabled=False``).
* :func:`peak_rss_mb` / :class:`MemoryMonitor`: peak resident memory, and the peak of
  *anonymous* memory (RssAnon, sampled): memory-mapped checkpoint files show up in RSS as
  page cache the kernel may drop, so anonymous memory is what a conversion really holds.
* :class:`SpillStore`: tensors written to a scratch file and mapped back (``mmap``), so a
  writer that needs the whole state dict at the end (DCP) holds file-backed pages, not
  anonymous memory.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import Dict, Optional

import torch

__all__ = ["Progress", "MemoryMonitor", "peak_rss_mb", "anon_rss_mb", "SpillStore"]


class Progress:
    """``update(n)`` / ``close()`` over ``total`` steps."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.count = total, desc, 0
        self._bar = None
        self.enabled = enabled
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
        except ImportError:
            self._bar = None

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        else:
            print(f"\r{self.desc}: {self.count}/{self.total}", end="", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def anon_rss_mb() -> float:
    """Current anonymous resident memory (MiB), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class MemoryMonitor:
    """Samples anonymous memory in a thread; ``peak_anon_mb`` after ``stop()``."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_anon_mb = anon_rss_mb()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "MemoryMonitor":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon_mb = max(self.peak_anon_mb, anon_rss_mb())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_anon_mb = max(self.peak_anon_mb, anon_rss_mb())


class SpillStore:
    """Tensors parked on disk in ``directory`` and mapped back read-only.

    ``put(tensors)`` writes one file per call (call it per layer) and returns the same
    tensors as memory-mapped views; the caller drops its own copies.
    """

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._count = 0

    def put(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        path = os.path.join(self.directory, f"spill_{self._count:06d}.pt")
        self._count += 1
        torch.save({k: v.contiguous() for k, v in tensors.items()}, path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
