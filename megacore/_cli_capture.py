"""Child process of :func:`megacore.surfaces.cli_surface`: read each program's flags.

    python -m megacore._cli_capture ROOT PROGRAM.py...

Each program runs as ``__main__`` with ``--help``; the first parser asked to print its
help is captured instead (so the program stops there), and its actions are described.
A program that starts its (world-of-one) process group before parsing still works; the
group is destroyed after each program. Prints one JSON line: ``{program: {flag: description}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import sys
from typing import Any, Dict

_KINDS = {
    argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
    argparse._StoreFalseAction: "store_false", argparse._StoreConstAction: "store_const",
    argparse._AppendAction: "append", argparse._CountAction: "count",
    argparse.BooleanOptionalAction: "boolean_optional",
}


class _Captured(BaseException):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def describe(parser: argparse.ArgumentParser) -> Dict[str, Any]:
    flags = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if isinstance(action, argparse._SubParsersAction):
            flags[action.dest or "command"] = {"subcommands": sorted(action.choices)}
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        key = longs[0] if longs else (action.option_strings or [action.dest])[0]
        entry = {
            "action": _KINDS.get(type(action), type(action).__name__),
            "aliases": sorted(set(action.option_strings) - {key}),
            "dest": action.dest,
            "type": getattr(action.type, "__name__", _jsonable(action.type)),
            "default": _jsonable(action.default),
            "choices": _jsonable(list(action.choices)) if action.choices else None,
            "nargs": _jsonable(action.nargs),
            "required": bool(action.required) or not action.option_strings,
        }
        entry.update(_config_field(action.dest))
        flags[key] = {k: v for k, v in entry.items() if v not in (None, [])}
    for old, info in sorted(getattr(parser, "deprecated_flags", {}).items()):
        flags[old] = {"deprecated_for": info["replacement"], "removed_in": info["removed_in"]}
    return flags


def _config_field(dest: str) -> Dict[str, Any]:
    """For a flag generated from a config field: the field and its (real) default.

    Generated flags default to None on the parser (so a checkpoint's or YAML file's
    value can fill them); the default users get is the dataclass field's.
    """
    arguments = sys.modules.get("megacore.training.arguments")
    if arguments is None:
        return {}
    import dataclasses

    for flag in arguments.FLAGS:
        if flag.flag.lstrip("-").replace("-", "_") == dest:
            cls = arguments.SECTIONS[flag.section]
            field = {f.name: f for f in dataclasses.fields(cls)}.get(flag.field)
            out = {"setting": f"{flag.section}.{flag.field}"}
            if field is not None and field.default is not dataclasses.MISSING:
                out["field_default"] = _jsonable(field.default)
            return out
    return {}


def capture(path: str) -> Dict[str, Any]:
    import torch.distributed

    def stop_help(self, file=None):
        raise _Captured(self)

    saved = argparse.ArgumentParser.print_help, sys.argv
    argparse.ArgumentParser.print_help = stop_help
    sys.argv = [path, "--help"]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            runpy.run_path(path, run_name="__main__")
    except _Captured as captured:
        return describe(captured.parser)
    except (SystemExit, Exception) as error:  # noqa: BLE001
        return {"<no --help>": {"error": type(error).__name__}}
    finally:
        argparse.ArgumentParser.print_help, sys.argv = saved
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return {"<no --help>": {"error": "the program finished without parsing --help"}}


def _relative_to(root: str, value: Any) -> Any:
    """Defaults that are paths inside the checkout, written as ``<repo>/...`` (the
    snapshot must not depend on where the repository was cloned)."""
    if isinstance(value, dict):
        return {k: _relative_to(root, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_to(root, v) for v in value]
    if isinstance(value, str) and value.startswith(root):
        return "<repo>" + value[len(root):]
    return value


def main(argv) -> int:
    root, paths = os.path.abspath(argv[0]), argv[1:]
    out = {p: _relative_to(root, capture(os.path.join(root, p))) for p in paths}
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
