"""The argparse parser, generated from the flag table and the config dataclasses.

Each row of :data:`~megacore.training.megatron_flags.FLAGS` becomes one argument: type,
choices and help text (the field's docstring) come from the dataclass field it sets.
Every flag defaults to None on the parser, so that a ``--yaml-cfg`` file or a checkpoint's
saved config can fill what the command line leaves out; the dataclass default applies
last. :func:`read_flag_values` parses a command line once into those values.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
import typing
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

from megacore.deprecation import DeprecatedFlag, rename_deprecated_flags, warn_deprecated
from megacore.training.flag_error import FlagError
from megacore.training.launch_env import is_launch_rank_zero, record_for_launcher
from megacore.training.megatron_flags import FLAGS, SECTIONS, Flag, flag_dest

__all__ = ["build_parser", "read_flag_values", "FlagValues", "field_info", "DEPRECATED_FLAGS"]

DEPRECATED_FLAGS: List[DeprecatedFlag] = []
"""Renamed or removed flags that keep working, with a warning, until their ``removed_in``
(at least two minor versions: :class:`~megacore.deprecation.DeprecatedFlag`). They are
accepted on the command line and as ``--yaml-cfg`` keys, listed by ``--help``, and pinned
in the command-line snapshot like any flag. Add a row when renaming or removing a flag."""


@functools.lru_cache(maxsize=None)
def _field_docs(cls) -> Dict[str, str]:
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _scalar_type(annotation) -> Optional[type]:
    """int/float/str/bool of a field annotation (Optional and List unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else None
    if origin in (list, List, tuple, typing.Tuple):
        return _scalar_type(typing.get_args(annotation)[0])
    return annotation if annotation in (int, float, str, bool) else None


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def field_info(flag: Flag):
    """``(scalar type, dataclass default)`` of the field a flag sets."""
    cls = SECTIONS[flag.section]
    hints = _type_hints(cls)
    if flag.derived:
        return flag.type, None
    if flag.field not in hints:
        raise KeyError(f"{flag.flag}: {cls.__name__} has no field {flag.field!r}")
    field = {f.name: f for f in dataclasses.fields(cls)}[flag.field]
    default = field.default if field.default is not dataclasses.MISSING else None
    return _scalar_type(hints[flag.field]), default


def _plain(text: str) -> str:
    """Help text for a terminal: no reST ``literal`` markup, ``%`` escaped for argparse."""
    return text.replace("``", "").replace("%", "%%")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage (the full list is ``--help``'s job) whose errors are
    printed by launch rank 0 only: under torchrun every rank parses the same flags, and
    the user should read one ``error:`` line, not one per rank."""

    def error(self, message: str):
        record_for_launcher(f"error: {message}")
        if is_launch_rank_zero():
            self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n" if is_launch_rank_zero() else None)


def build_parser(extra_args_provider=None, *, only: Optional[Sequence[str]] = None,
                 description: str = "megacore GPT pretraining (Megatron-style flags)"
                 ) -> argparse.ArgumentParser:
    """The argparse parser for every flag in ``FLAGS`` (plus ``--yaml-cfg``), or only for
    the flags named in ``only`` (a program that needs a few of them, like the server)."""
    parser = _ArgumentParser(description=description, allow_abbrev=False,
                             usage="%(prog)s [flags]   (--help lists them)")
    parser.add_argument("--yaml-cfg", default=None,
                        help="YAML file with the same settings; command-line flags win")
    docs = {name: _field_docs(cls) for name, cls in SECTIONS.items()}
    groups = {name: parser.add_argument_group(name) for name in SECTIONS}
    for flag in FLAGS:
        if only is not None and flag.flag not in only:
            continue
        kind, default = field_info(flag)
        help_text = _plain(flag.help or docs[flag.section].get(flag.field, "")
                           or (f"Megatron-LM's flag, mapped: {flag.setting}" if flag.setting
                               else ""))
        if flag.invert:  # the docstring describes the field this switch turns off
            help_text = f"Turns off: {help_text}"
        if default is not None and not isinstance(default, bool):
            help_text += f" (default: {_plain(str(default))})"
        kwargs: Dict[str, Any] = dict(dest=flag_dest(flag), default=None, help=help_text)
        if kind is bool and flag.nargs is None:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=kind or str)
            if flag.choices:
                kwargs["choices"] = flag.choices
            if flag.nargs:
                kwargs["nargs"] = flag.nargs
        groups[flag.section].add_argument(flag.flag, **kwargs)
    _add_deprecated_flags(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def _add_deprecated_flags(parser: argparse.ArgumentParser) -> None:
    """Describe the deprecated aliases in ``--help`` (they are renamed before parsing)."""
    parser.deprecated_flags = {row.flag: {"replacement": row.replacement,
                                          "removed_in": row.removed_in}
                               for row in DEPRECATED_FLAGS}
    if DEPRECATED_FLAGS:
        parser.epilog = "deprecated flags (still accepted, with a warning): " + "; ".join(
            f"{row.flag} -> {row.replacement} (removed in {row.removed_in})"
            for row in DEPRECATED_FLAGS)


def _load_yaml(path: str) -> Dict[str, Any]:
    """The settings of a ``--yaml-cfg`` file as argparse destinations (keys may be field
    names or flag names; deprecated names are renamed with a warning)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f) or {}
    except OSError as e:
        raise FlagError(f"--yaml-cfg {path}: cannot read: {e}", "--yaml-cfg") from e
    except yaml.YAMLError as e:
        raise FlagError(f"--yaml-cfg {path}: invalid YAML: {e}", "--yaml-cfg") from e
    if not isinstance(content, dict):
        raise FlagError(f"--yaml-cfg {path}: expected a mapping of settings", "--yaml-cfg")
    known = {flag_dest(f): f for f in FLAGS}
    renamed = {flag_dest(Flag(r.flag, "", "")): r for r in DEPRECATED_FLAGS}
    out = {}
    for key, value in content.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest in renamed:
            row = renamed[dest]
            warn_deprecated(f"--yaml-cfg key {key!r}", since=row.since,
                            removed_in=row.removed_in, alternative=row.replacement)
            dest = flag_dest(Flag(row.replacement, "", ""))
        if dest not in known:
            raise FlagError(f"--yaml-cfg {path}: unknown setting {key!r}", "--yaml-cfg")
        out[dest] = value
    return out


class FlagValues(NamedTuple):
    """The flags of one command line: ``values`` by argparse destination (command line
    over ``--yaml-cfg``; flags not given are absent) and the ``--yaml-cfg`` path."""

    values: Dict[str, Any]
    yaml_cfg: Optional[str]


def read_flag_values(argv: Optional[Sequence[str]] = None, *, extra_args_provider=None,
                     ignore_unknown_args: bool = False) -> FlagValues:
    """Parse ``argv`` (default ``sys.argv[1:]``) once, and merge the ``--yaml-cfg`` file
    under it: every later step (the checkpoint to read for ``--load``, the process group's
    ``--distributed-backend``) reads these values, so a setting given in the YAML file
    counts the same as on the command line."""
    parser = build_parser(extra_args_provider)
    argv = rename_deprecated_flags(sys.argv[1:] if argv is None else argv, DEPRECATED_FLAGS)
    if ignore_unknown_args:
        ns, _ = parser.parse_known_args(argv)
    else:
        ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if v is not None and v is not False}
    if ns.yaml_cfg:
        values = {**_load_yaml(ns.yaml_cfg), **values}
    return FlagValues(values, ns.yaml_cfg)
