"""Inspect and verify a checkpoint without building a model.

:func:`read_checkpoint_info` reads only metadata (legacy files are memory-mapped, DCP's
``.metadata`` lists global tensor shapes) and returns a :class:`CheckpointInfo`: format,
versions, parallel layout, configuration, iteration, consumed samples and every tensor
with its shape. :func:`verify_checkpoint` reads every byte and lists what is missing or
unreadable. ``tools/checkpoint/inspect.py`` prints both.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import textwrap
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from megacore.checkpointing.dist_checkpoint import (
    list_tensors,
    read_common,
    read_dcp_metadata,
    read_full_tensors,
    verify_dcp_files,
)
from megacore.checkpointing.errors import CheckpointError
from megacore.checkpointing.integrity import DIGEST_SUFFIX, check_digests, has_digests
from megacore.checkpointing.legacy import read_legacy_file
from megacore.checkpointing.paths import (
    LEGACY_FILENAME,
    detect_format,
    legacy_rank_dirname,
    resolve_checkpoint_dir,
    rng_file_path,
)

__all__ = ["CheckpointInfo", "read_checkpoint_info", "verify_checkpoint",
           "format_checkpoint_info"]

_COMMON_KEYS = ("checkpoint_version", "megacore_version", "iteration",
                "consumed_train_samples", "consumed_valid_samples", "config",
                "parallel_layout", "num_model_chunks")


@dataclasses.dataclass
class CheckpointInfo:
    """What a checkpoint holds.

    Attributes:
        path: the iteration directory.
        format: ``"torch"`` (legacy) or ``"torch_dist"``.
        iteration: saved iteration.
        checkpoint_version: file-contents version.
        megacore_version: version of megacore that wrote it.
        parallel_layout: degrees at save time (tp, pp, dp, cp, ep, expert tp, vpp, world).
        num_model_chunks: model chunks per rank (virtual pipeline stages).
        config: the saved run configuration.
        consumed_train_samples, consumed_valid_samples: data position.
        tensors: ``(key, shape, dtype)``; legacy keys are ``<mp_rank dir>/<path in file>``,
            distributed keys are global (shapes are global).
        files: data files, relative to ``path``.
    """

    path: str
    format: str
    iteration: Optional[int]
    checkpoint_version: Optional[float]
    megacore_version: Optional[str]
    parallel_layout: Dict[str, Any]
    num_model_chunks: int
    config: Optional[Dict[str, Any]]
    consumed_train_samples: Optional[int]
    consumed_valid_samples: Optional[int]
    tensors: List[Tuple[str, Tuple[int, ...], str]]
    files: List[str]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _walk_tensors(obj: Any, prefix: str) -> Iterator[Tuple[str, torch.Tensor]]:
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk_tensors(value, f"{prefix}.{i}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _legacy_files(iter_dir: str) -> List[str]:
    return sorted(os.path.relpath(p, iter_dir) for p in
                  glob.glob(os.path.join(iter_dir, "mp_rank_*", LEGACY_FILENAME)))


def _from_common(path: str, fmt: str, common: Dict[str, Any], tensors, files) -> CheckpointInfo:
    values = {k: common.get(k) for k in _COMMON_KEYS}
    return CheckpointInfo(path=path, format=fmt, tensors=tensors, files=files,
                          parallel_layout=values.pop("parallel_layout") or {},
                          num_model_chunks=values.pop("num_model_chunks") or 1, **values)


def _legacy_info(iter_dir: str) -> CheckpointInfo:
    files = _legacy_files(iter_dir)
    tensors, common = [], None
    for rel in files:
        state = read_legacy_file(os.path.join(iter_dir, rel), mmap=True)
        common = common or state
        rank_dir = os.path.dirname(rel)
        tensors += [(f"{rank_dir}/{key}", tuple(t.shape), _dtype_name(t.dtype))
                    for key, t in _walk_tensors(state, "") if not key.startswith("rng_state")]
    return _from_common(iter_dir, "torch", common, tensors, files)


def _dist_info(iter_dir: str) -> CheckpointInfo:
    common = read_common(iter_dir)
    md = read_dcp_metadata(iter_dir)
    files = sorted({info.relative_path for info in (md.storage_data or {}).values()})
    return _from_common(iter_dir, "torch_dist", common, list_tensors(iter_dir),
                        [".metadata", "common.pt"] + files)


def read_checkpoint_info(load_dir: str) -> CheckpointInfo:
    """Describe the latest checkpoint under ``load_dir`` (or the iteration directory
    ``load_dir``) from metadata only.

    Raises:
        CheckpointError: nothing readable there (the message names the path).
    """
    iter_dir, _ = resolve_checkpoint_dir(load_dir)
    if detect_format(iter_dir) == "torch":
        return _legacy_info(iter_dir)
    return _dist_info(iter_dir)


def _expected_legacy_files(layout: Dict[str, Any]) -> List[str]:
    tp, pp = layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
    ep = layout["expert_model_parallel_size"]
    return [os.path.join(legacy_rank_dirname(t, p, pp, e, ep), LEGACY_FILENAME)
            for p in range(pp) for t in range(tp) for e in range(ep)]


def _non_finite(path: str, tensors: Iterator[Tuple[str, torch.Tensor]]) -> List[str]:
    problems = []
    for key, tensor in tensors:
        if tensor.is_floating_point() and tensor.numel():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                problems.append(f"{path}: tensor {key} holds {bad} non-finite value(s) "
                                f"(NaN/Inf) of {tensor.numel()}")
    return problems


def _verify_legacy(info: CheckpointInfo) -> List[str]:
    files = [os.path.join(info.path, rel)
             for rel in _expected_legacy_files(info.parallel_layout)]
    problems = check_digests(files) if has_digests(info.path) else []
    for path in files:
        if any(p.startswith(f"{path}:") for p in problems):
            continue  # already named; its bytes are not worth parsing
        try:
            state = read_legacy_file(path)  # a full read: every tensor's bytes
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if state.get("iteration") != info.iteration:
            problems.append(f"{path}: iteration {state.get('iteration')}, expected "
                            f"{info.iteration}")
        problems += _non_finite(path, _walk_tensors(state, ""))
    return problems


def _dist_files(info: CheckpointInfo) -> List[str]:
    world = int(info.parallel_layout.get("world_size", 1))
    rng = [rng_file_path(info.path, r) for r in range(world)]
    return [os.path.join(info.path, rel) for rel in info.files] + \
        [p for p in rng if os.path.isfile(p + DIGEST_SUFFIX) or os.path.isfile(p)]


def _verify_dist(info: CheckpointInfo) -> List[str]:
    problems = verify_dcp_files(info.path)
    if has_digests(info.path):
        problems += [p for p in check_digests(_dist_files(info)) if p not in problems]
    if not problems:
        try:
            tensors = read_full_tensors(info.path, [key for key, _, _ in info.tensors])
            problems += _non_finite(info.path, iter(sorted(tensors.items())))
        except BaseException as exc:  # noqa: BLE001 - DCP raises BaseException subclasses
            problems.append(f"{info.path}: reading tensors failed ({exc!r})")
    world = int(info.parallel_layout.get("world_size", 1))
    rng_files = [rng_file_path(info.path, r) for r in range(world)]
    present = [p for p in rng_files if os.path.isfile(p)]
    if present and len(present) != world:
        problems += [f"{p}: missing" for p in rng_files if p not in present]
    for path in present:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{path}: unreadable ({exc})")
    return problems


def verify_checkpoint(load_dir: str) -> List[str]:
    """Read every file of the checkpoint, check it against the digests recorded at save
    (when the checkpoint has them) and every floating tensor for NaN/Inf; returns the
    problems found, each naming its file (empty: all good)."""
    try:
        info = read_checkpoint_info(load_dir)
    except CheckpointError as exc:
        return [str(exc)]
    return _verify_legacy(info) if info.format == "torch" else _verify_dist(info)


def _format_config(config, width: int = 100) -> List[str]:
    """``config:`` then one wrapped block of ``field=value`` per section (the saved run
    configuration has a few hundred fields: one JSON line would be unreadable)."""
    if not isinstance(config, dict) or not config:
        return [f"config: {json.dumps(config)}"]
    lines = ["config:"]
    for section in sorted(config):
        values = config[section]
        if not isinstance(values, dict):
            lines.append(f"  {section}: {json.dumps(values, default=str)}")
            continue
        pairs = [f"{k}={json.dumps(v, default=str)}" for k, v in sorted(values.items())]
        lines += textwrap.wrap(" ".join(pairs), width=width, initial_indent=f"  {section}: ",
                               subsequent_indent=" " * (len(section) + 4),
                               break_on_hyphens=False) or [f"  {section}:"]
    return lines


def format_checkpoint_info(info: CheckpointInfo, show_tensors: bool = True) -> str:
    """Human-readable summary (the inspect tool's output)."""
    lay = info.parallel_layout
    lines = [f"checkpoint: {info.path}",
             f"format: {info.format}   checkpoint_version: {info.checkpoint_version}   "
             f"megacore_version: {info.megacore_version}",
             f"iteration: {info.iteration}   consumed_train_samples: "
             f"{info.consumed_train_samples}   consumed_valid_samples: "
             f"{info.consumed_valid_samples}",
             "layout: " + "  ".join(f"{k}={lay.get(v)}" for k, v in (
                 ("tp", "tensor_model_parallel_size"), ("pp", "pipeline_model_parallel_size"),
                 ("dp", "data_parallel_size"), ("cp", "context_parallel_size"),
                 ("ep", "expert_model_parallel_size"),
                 ("etp", "expert_tensor_parallel_size"),
                 ("vpp", "virtual_pipeline_model_parallel_size"), ("world", "world_size"))),
             f"model chunks per rank: {info.num_model_chunks}",
             *_format_config(info.config),
             f"files: {len(info.files)}   tensors: {len(info.tensors)}"]
    if show_tensors:
        lines += [f"  {key}  {list(shape)}  {dtype}" for key, shape, dtype in info.tensors]
    return "\n".join(lines)

