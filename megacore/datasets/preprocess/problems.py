"""Reporting bad input lines (``file:line: problem``) and progress."""

from __future__ import annotations

import time

_MAX_PRINTED_PROBLEMS = 50


class PreprocessError(Exception):
    """A problem that stops the run (fatal input or output error, or any problem with
    ``strict``). Its message names the file (and line)."""


class ProblemLog:
    """Collects ``file:line: problem`` reports; with ``strict`` the first one is fatal."""

    def __init__(self, strict: bool, stream) -> None:
        self.strict = strict
        self.stream = stream
        self.count = 0

    def report(self, path: str, line: int, message: str) -> None:
        location = f"{path}:{line}" if line else path
        if self.strict:
            raise PreprocessError(f"{location}: {message} (stopped: --strict)")
        self.count += 1
        if self.count <= _MAX_PRINTED_PROBLEMS:
            print(f"{location}: {message} (skipped)", file=self.stream, flush=True)
        elif self.count == _MAX_PRINTED_PROBLEMS + 1:
            print("... more problems; only the count is reported from here", file=self.stream)


class Progress:
    """Prints ``Processed N documents (docs/s, tokens/s, MB/s)`` every ``interval``."""

    def __init__(self, interval: int, stream) -> None:
        self.interval = interval
        self.stream = stream
        self.start = time.monotonic()
        self.documents = self.tokens = self.bytes = 0
        self._next_report = interval

    def update(self, documents: int, tokens: int, num_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += num_bytes
        # A batch may cross several multiples of the interval: one line for each.
        while self.documents >= self._next_report:
            print(f"Processed {self._next_report} documents ({self._rates()}).",
                  file=self.stream, flush=True)
            self._next_report += self.interval

    def _rates(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (f"{self.documents / elapsed:.1f} docs/s, {self.tokens / elapsed:,.0f} tokens/s, "
                f"{self.bytes / elapsed / 2**20:.2f} MB/s")

    def summary(self) -> str:
        elapsed = time.monotonic() - self.start
        return (f"{self.documents} documents, {self.tokens:,} tokens in {elapsed:.2f}s "
                f"({self._rates()})")
