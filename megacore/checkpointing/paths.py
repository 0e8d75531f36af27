"""Where checkpoint files live: directory names, the tracker file, format detection.

Layout under a save directory (Megatron's names)::

    {save}/latest_checkpointed_iteration.txt        "1000": the latest complete save
    {save}/iter_0001000/                             one directory per saved iteration
        legacy ("torch"):      mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt
                               (pp suffix only when pp > 1, ep suffix only when ep > 1)
        distributed ("torch_dist"): .metadata, __{rank}_0.distcp (DCP), common.pt,
                               rng/rank_{global rank:05d}.pt

Worked example, tp=2, pp=2, ep=1: ``iter_0000010/mp_rank_00_000``, ``mp_rank_01_000``,
``mp_rank_00_001``, ``mp_rank_01_001``. With pp=1, ep=2: ``mp_rank_00_000`` means tp rank 0,
ep rank 0 (the same spelling as Megatron-LM, which is ambiguous only to a human).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

from megacore.checkpointing.atomic import atomic_write_bytes
from megacore.checkpointing.errors import CheckpointError

__all__ = ["TRACKER_FILENAME", "LEGACY_FILENAME", "COMMON_FILENAME", "DCP_METADATA_FILENAME",
           "iteration_dir", "legacy_rank_dirname", "legacy_file_path", "rng_file_path",
           "write_tracker", "read_tracker", "resolve_checkpoint_dir", "detect_format"]

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
LEGACY_FILENAME = "model_optim_rng.pt"
COMMON_FILENAME = "common.pt"
DCP_METADATA_FILENAME = ".metadata"
_RELEASE = "release"


def iteration_dir(save_dir: str, iteration: int) -> str:
    """``{save_dir}/iter_{iteration:07d}``."""
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def legacy_rank_dirname(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0,
                        ep_size: int = 1) -> str:
    """``mp_rank_TT[_PPP][_EEE]`` (pp part when ``pp_size > 1``, ep part when ``ep_size > 1``)."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def legacy_file_path(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int,
                     ep_rank: int = 0, ep_size: int = 1) -> str:
    return os.path.join(iter_dir, legacy_rank_dirname(tp_rank, pp_rank, pp_size, ep_rank,
                                                      ep_size), LEGACY_FILENAME)


def rng_file_path(iter_dir: str, global_rank: int) -> str:
    """Per-rank RNG file of the distributed format."""
    return os.path.join(iter_dir, "rng", f"rank_{global_rank:05d}.pt")


def write_tracker(save_dir: str, iteration: int) -> None:
    """Atomically point ``latest_checkpointed_iteration.txt`` at ``iteration``."""
    atomic_write_bytes(os.path.join(save_dir, TRACKER_FILENAME), f"{iteration}".encode())


def read_tracker(load_dir: str) -> Optional[int]:
    """The iteration named by the tracker file (0 for ``release``), or None if absent."""
    path = os.path.join(load_dir, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    text = _tracker_text(path)
    if text == _RELEASE:
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: tracker file should hold an iteration number or "
                              f"'release', found {text[:40]!r}") from None


def _tracker_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read(64)
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: tracker file should hold an iteration number or "
                              f"'release' in ASCII, found binary bytes {raw[:16]!r}") from None


def _looks_like_iteration_dir(path: str) -> bool:
    return detect_format(path, missing_ok=True) is not None


def resolve_checkpoint_dir(load_dir: str) -> Tuple[str, Optional[int]]:
    """``(iteration directory, iteration or None)`` for a save directory with a tracker,
    or for an iteration directory given directly.

    Raises:
        CheckpointError: nothing loadable at ``load_dir`` (message names the path).
    """
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint directory {load_dir!r} does not exist")
    iteration = read_tracker(load_dir)
    if iteration is not None:
        text = _tracker_text(os.path.join(load_dir, TRACKER_FILENAME))
        path = os.path.join(load_dir, _RELEASE) if text == _RELEASE \
            else iteration_dir(load_dir, iteration)
        if not os.path.isdir(path):
            raise CheckpointError(f"{os.path.join(load_dir, TRACKER_FILENAME)} names iteration "
                                  f"{iteration}, but {path!r} does not exist")
        return path, iteration
    if _looks_like_iteration_dir(load_dir):
        base = os.path.basename(os.path.normpath(load_dir))
        iteration = int(base[5:]) if base.startswith("iter_") and base[5:].isdigit() else None
        return load_dir, iteration
    raise CheckpointError(f"no checkpoint at {load_dir!r}: no {TRACKER_FILENAME} and not an "
                          "iteration directory (iter_XXXXXXX with mp_rank_* or .metadata)")


def detect_format(iter_dir: str, missing_ok: bool = False) -> Optional[str]:
    """``"torch"`` (legacy) or ``"torch_dist"`` for an iteration directory."""
    try:
        entries = os.listdir(iter_dir)
    except OSError:
        entries = []
    if any(e.startswith("mp_rank_") for e in entries):
        return "torch"
    if COMMON_FILENAME in entries or DCP_METADATA_FILENAME in entries:
        return "torch_dist"
    if missing_ok:
        return None
    raise CheckpointError(f"{iter_dir!r} holds no checkpoint (neither mp_rank_* directories "
                          f"nor {COMMON_FILENAME}/{DCP_METADATA_FILENAME})")
