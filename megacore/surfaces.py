"""The versioned surfaces of megacore, extracted from the code, and the semver rule.

Users depend on five surfaces; each is pinned by a snapshot under ``tests/`` and changes
only together with the version and the CHANGELOG (``tools/api_snapshot.py --update``):

========== ======================================================================
python_api names in each package's ``__all__`` with signatures (``api_snapshot.json``)
cli        every program's flags under ``tools/`` and ``examples/``: type, default,
           choices, nargs, action; deprecated aliases with their replacement
config     the run-config schema (``--yaml-cfg`` keys, what checkpoints store): each
           section's fields with type and default
http       the OpenAPI document FastAPI produces for the server, with the
           streaming event format
checkpoint the format version and the on-disk schema (files, keys, dtypes) of a
           tiny dense+MoE checkpoint in each format, with Adam state
========== ======================================================================

The rule (:func:`classify`): a removed entry or a changed value breaks compatibility and
needs a MAJOR bump (MINOR while MAJOR is 0); an added entry, or a grown ``choices`` /
``enum`` list, needs a MINOR bump. A new entry in a ``required`` list breaks.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import inspect
import json
import os
import pkgutil
import shlex
import subprocess
import sys
import tempfile
import typing
from typing import Any, Callable, Dict, List, Tuple

__all__ = ["SURFACES", "Surface", "python_api", "cli_surface", "config_surface",
           "http_surface", "checkpoint_surface", "diff_surface", "required_bump",
           "bump_is_enough", "programs"]

# -- the Python API -------------------------------------------------------------------------


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _describe(obj):
    if inspect.isclass(obj):
        entry = {"kind": "class", "init": _signature(obj.__init__)}
        methods = {}
        for name, member in sorted(vars(obj).items()):
            if name.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if inspect.isfunction(member):
                methods[name] = _signature(member)
        entry["methods"] = methods
        if dataclasses.is_dataclass(obj):
            entry["fields"] = [f.name for f in dataclasses.fields(obj)]
        return entry
    if callable(obj):
        return {"kind": "function", "signature": _signature(obj)}
    return {"kind": type(obj).__name__}


def public_modules() -> List[str]:
    """megacore, its packages and its top-level modules (private names excluded)."""
    import megacore

    names = ["megacore"]
    for info in pkgutil.walk_packages(megacore.__path__, "megacore."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts):
            continue
        if info.ispkg or len(parts) == 2:
            names.append(info.name)
    return sorted(names)


def python_api(root: str = "") -> Dict[str, Any]:
    api = {}
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        exported = getattr(module, "__all__", None)
        if exported is not None:
            api[module_name] = {n: _describe(getattr(module, n)) for n in sorted(exported)}
    return api


def diff_python_api(old: dict, new: dict) -> Tuple[List[str], List[str]]:
    """(added, removed_or_changed) as ``module.name`` strings."""
    added, broken = [], []
    for module in sorted(set(old) | set(new)):
        o, n = old.get(module, {}), new.get(module, {})
        for name in sorted(set(o) | set(n)):
            key = f"{module}.{name}"
            if name not in o:
                added.append(key)
            elif name not in n:
                broken.append(f"{key} (removed)")
            elif o[name] != n[name]:
                (added if _only_additions(o[name], n[name]) else broken).append(
                    f"{key} (changed)")
    return added, broken


def _only_additions(old_entry: dict, new_entry: dict) -> bool:
    """A class that only gained methods or fields is an addition, not a break."""
    if old_entry.get("kind") != "class" or new_entry.get("kind") != "class":
        return False
    if old_entry["init"] != new_entry["init"] and "fields" not in old_entry:
        return False
    old_methods, new_methods = old_entry["methods"], new_entry["methods"]
    if any(new_methods.get(k) != v for k, v in old_methods.items()):
        return False
    old_fields, new_fields = old_entry.get("fields", []), new_entry.get("fields", [])
    return new_fields[:len(old_fields)] == old_fields


# -- the generic rule for the other surfaces -----------------------------------------------
_GROWABLE = {"choices", "enum"}      # a longer list accepts more: an addition
_NEW_ITEMS_BREAK = {"required"}      # a longer list demands more: a break


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: Dict[str, Any] = {}
        for key in sorted(tree):
            out.update(_flatten(tree[key], f"{prefix}/{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def classify(path: str, old: Any, new: Any) -> str:
    """``"added"`` or ``"broken"`` for a leaf whose value changed from ``old`` to ``new``."""
    leaf = path.rsplit("/", 1)[-1]
    if isinstance(old, list) and isinstance(new, list):
        grown = set(map(json.dumps, new)) >= set(map(json.dumps, old))
        if leaf in _GROWABLE and grown:
            return "added"
        if leaf in _NEW_ITEMS_BREAK and not grown:
            return "added"  # fewer required items: every old request still works
    return "broken"


def diff_surface(old: Any, new: Any) -> Tuple[List[str], List[str]]:
    """(added, broken) leaf paths between two snapshots of one surface."""
    o, n = _flatten(old), _flatten(new)
    added, broken = [], []
    for path in sorted(set(o) | set(n)):
        if path not in o:
            added.append(f"{path} (added)")
        elif path not in n:
            broken.append(f"{path} (removed)")
        elif o[path] != n[path]:
            kind = classify(path, o[path], n[path])
            (added if kind == "added" else broken).append(
                f"{path}: {json.dumps(o[path])} -> {json.dumps(n[path])}")
    return added, broken


def required_bump(old_version: str, added, broken) -> str:
    from megacore.deprecation import parse_version

    if broken:
        return "major" if parse_version(old_version)[0] >= 1 else "minor"
    return "minor" if added else "none"


def bump_is_enough(old_version: str, new_version: str, needed: str) -> bool:
    from megacore.deprecation import parse_version

    o, n = parse_version(old_version), parse_version(new_version)
    if needed == "major":
        return n[0] > o[0]
    if needed == "minor":
        return n[:2] > o[:2]
    return True


# -- command lines ------------------------------------------------------------------------------
def programs(root: str) -> List[str]:
    """Every program under tools/ and examples/: a file with a ``__main__`` guard, or a
    directory run as a script (``tools/checkpoint/inspect.py/__main__.py``)."""
    found = set()
    for path in (glob.glob(os.path.join(root, "tools", "**", "*.py"), recursive=True)
                 + glob.glob(os.path.join(root, "examples", "**", "*.py"), recursive=True)):
        if os.path.basename(path) == "__main__.py":
            found.add(os.path.relpath(os.path.dirname(path), root))
            continue
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if "__name__ == \"__main__\"" in f.read():
                    found.add(os.path.relpath(path, root))
    return sorted(found)


def cli_surface(root: str) -> Dict[str, Any]:
    """``{program: {flag: description}}``, read from each program's own argparse parser.

    The parsers are captured in one child process (``--help`` is intercepted before
    anything prints), so nothing a program does at start-up leaks into the caller.
    """
    cmd = [sys.executable, "-m", "megacore._cli_capture", root, *programs(root)]
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"capturing the command lines failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the run-config schema ---------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if callable(value):
        return f"<callable {getattr(value, '__name__', type(value).__name__)}>"
    return repr(value)


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else typing._type_repr(annotation)  # noqa
    return text.replace("typing.", "")


def config_surface(root: str = "") -> Dict[str, Any]:
    """``{section: {field: {"type", "default"}}}`` for every section of a run config."""
    from megacore.training.arguments import SECTIONS

    out = {}
    for section, cls in SECTIONS.items():
        fields = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = "<required>"
            fields[f.name] = {"type": _type_name(f.type), "default": _jsonable(default)}
        out[section] = fields
    return out


# -- the HTTP API ------------------------------------------------------------------------------
class _NoService:
    """Enough of a GenerationService for building the app (nothing is served)."""

    class controller:  # noqa: N801 - mimics the attribute
        validate_request = None


def http_surface(root: str = "") -> Dict[str, Any]:
    """The server's OpenAPI document (without its version string) and stream format."""
    from megacore.inference.api_schema import STREAM_FORMAT
    from megacore.inference.server import create_app

    document = create_app(_NoService(), None).openapi()
    document.get("info", {}).pop("version", None)  # the package version is not the API
    return {"openapi": document, "stream": STREAM_FORMAT}


# -- the checkpoint format ---------------------------------------------------------------------
CHECKPOINT_MODEL = ("--num-layers 2 --hidden-size 16 --num-attention-heads 2 --seq-length 8 "
                    "--max-position-embeddings 8 --micro-batch-size 1 --global-batch-size 1 "
                    "--lr 1e-3 --train-iters 1 --mock-data --vocab-size 32 --eval-iters 0 "
                    "--num-experts 2 --moe-ffn-hidden-size 16 --moe-layer-freq [0,1] "
                    "--log-interval 1")
"""A dense layer and an MoE layer, so both kinds of parameter names are pinned."""


def _schema_of(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return f"tensor:{str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, dict):
        return {str(k): _schema_of(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_schema_of(v) for v in obj]
    return type(obj).__name__


def _file_schema(path: str) -> Any:
    import torch

    name = os.path.basename(path)
    if name == ".metadata":
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(os.path.dirname(path)).read_metadata()
        return {key: type(value).__name__ for key, value in
                sorted(metadata.state_dict_metadata.items())}
    if name.endswith(".pt"):
        return _schema_of(torch.load(path, map_location="cpu", weights_only=True))
    return "file"


def _checkpoint_tree(directory: str) -> Dict[str, Any]:
    tree = {}
    for path in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)
                       + glob.glob(os.path.join(directory, "**", ".metadata"), recursive=True)):
        if os.path.isfile(path):
            tree[os.path.relpath(path, directory)] = _file_schema(path)
    return tree


def checkpoint_surface(root: str) -> Dict[str, Any]:
    """Format version and on-disk schema of a tiny checkpoint in each format."""
    from megacore.checkpointing import CHECKPOINT_VERSION, CKPT_FORMATS

    out: Dict[str, Any] = {"checkpoint_version": CHECKPOINT_VERSION}
    script = os.path.join(root, "examples", "pretrain_gpt.py")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for fmt in CKPT_FORMATS:
        with tempfile.TemporaryDirectory() as work:
            ckpt = os.path.join(work, "ckpt")
            argv = shlex.split(f"{CHECKPOINT_MODEL} --save {ckpt} --ckpt-format {fmt}")
            proc = subprocess.run([sys.executable, script, *argv], capture_output=True,
                                  text=True, env=env, cwd=work, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"saving a {fmt} checkpoint failed:\n{proc.stderr[-4000:]}")
            out[fmt] = _checkpoint_tree(ckpt)
    return out


# -- the registry ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Surface:
    """One versioned surface: its snapshot file, how to read it off the code, how to diff."""

    name: str
    title: str
    snapshot: str  # relative to the repository root
    extract: Callable[[str], Any]
    diff: Callable[[Any, Any], Tuple[List[str], List[str]]]


SURFACES: Dict[str, Surface] = {s.name: s for s in (
    Surface("python_api", "Python API", "tests/api_snapshot.json", python_api,
            diff_python_api),
    Surface("cli", "Command line", "tests/snapshots/cli.json", cli_surface, diff_surface),
    Surface("config", "Run-config schema", "tests/snapshots/config.json", config_surface,
            diff_surface),
    Surface("http", "HTTP API", "tests/snapshots/http.json", http_surface, diff_surface),
    Surface("checkpoint", "Checkpoint format", "tests/snapshots/checkpoint.json",
            checkpoint_surface, diff_surface),
)}
