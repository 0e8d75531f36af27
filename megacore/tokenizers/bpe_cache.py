"""On-disk cache of the tiktoken tables built from a GPT-2 ``vocab.json`` + ``merges.txt``.

Building the tables means parsing 50k merges, checking their order and converting every
token string to bytes: ~0.1 s, which is a third of preprocessing a few MB of text and is
paid again by every process that loads the tokenizer. The result depends only on the
two files, so it is cached under the sha256 of their contents (stale entries are
impossible; a changed file has another key) in ``~/.cache/megacore/bpe`` by default.

The cache is plain arrays in an ``.npz`` (no pickle): the token bytes concatenated, their
lengths and ranks, plus the special tokens. Writes go to a temporary name and are renamed,
so readers never see half a file; an unwritable or corrupt cache is skipped, never an error.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ["DEFAULT_CACHE_DIR", "load_ranks", "store_ranks"]

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "megacore", "bpe")
_FORMAT = 1

Ranks = Dict[bytes, int]
Specials = Dict[str, int]


def _path(cache_dir: str, digest: str) -> str:
    return os.path.join(cache_dir, f"{digest}.v{_FORMAT}.npz")


def load_ranks(cache_dir: Optional[str], digest: str
               ) -> Optional[Tuple[Ranks, Specials, Dict[str, int]]]:
    """``(mergeable ranks, special tokens, info)`` for ``digest``, or None if not cached."""
    if not cache_dir:
        return None
    try:
        with np.load(_path(cache_dir, digest), allow_pickle=False) as data:
            blob = data["token_bytes"].tobytes()
            ends = np.cumsum(data["token_lengths"]).tolist()
            ranks = data["ranks"].tolist()
            extra = json.loads(str(data["extra"]))
    except (OSError, KeyError, ValueError):
        return None
    starts = [0] + ends[:-1]
    mergeable = {blob[s:e]: r for s, e, r in zip(starts, ends, ranks)}
    return mergeable, extra["special"], extra["info"]


def store_ranks(cache_dir: Optional[str], digest: str, mergeable: Ranks, special: Specials,
                info: Dict[str, int]) -> None:
    """Cache the tables for ``digest`` (best effort)."""
    if not cache_dir:
        return
    tokens = list(mergeable)
    arrays = dict(
        token_bytes=np.frombuffer(b"".join(tokens), dtype=np.uint8),
        token_lengths=np.array([len(t) for t in tokens], dtype=np.int32),
        ranks=np.array([mergeable[t] for t in tokens], dtype=np.int64),
        extra=np.array(json.dumps({"special": special, "info": info})))
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, _path(cache_dir, digest))
    except OSError:
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass
