#!/usr/bin/env python
"""Snapshot of megacore's public API (names and signatures), and the semver rule for it.

    python tools/api_snapshot.py --check     # exit 1 and list differences if the API changed
    python tools/api_snapshot.py --update    # rewrite tests/api_snapshot.json

The public API is, for megacore and every public subpackage, the names in __all__:
functions with their signatures, classes with their constructor signature, public
methods and (for dataclasses) fields. --update refuses unless the version in
megacore/package_info.py was bumped enough for the change: removing or changing a
name needs a MAJOR bump (MINOR while MAJOR is 0), adding names needs a MINOR bump.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SNAPSHOT = os.path.join(ROOT, "tests", "api_snapshot.json")


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


def public_modules():
    import megacore

    names = ["megacore"]
    for info in pkgutil.walk_packages(megacore.__path__, "megacore."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts):
            continue
        # Packages (their __init__ defines __all__) and top-level modules of megacore.
        if info.ispkg or len(parts) == 2:
            names.append(info.name)
    return sorted(names)


def current_api() -> dict:
    api = {}
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            continue
        api[module_name] = {name: _describe(getattr(module, name)) for name in sorted(exported)}
    return api


def diff(old: dict, new: dict):
    """(added, removed_or_changed) lists of 'module.name' strings."""
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
                added_only = _only_additions(o[name], n[name])
                (added if added_only else broken).append(f"{key} (changed)")
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


def required_bump(old_version: str, added, broken) -> str:
    from megacore.deprecation import parse_version

    major = parse_version(old_version)[0]
    if broken:
        return "major" if major >= 1 else "minor"
    return "minor" if added else "none"


def bump_is_enough(old_version: str, new_version: str, needed: str) -> bool:
    from megacore.deprecation import parse_version

    o, n = parse_version(old_version), parse_version(new_version)
    if needed == "major":
        return n[0] > o[0]
    if needed == "minor":
        return n[:2] > o[:2]
    return True


def load_snapshot() -> dict:
    with open(SNAPSHOT, encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true",
                      help="compare the API with tests/api_snapshot.json; exit 1 on a difference")
    mode.add_argument("--update", action="store_true",
                      help="rewrite tests/api_snapshot.json (needs the version bump the change "
                           "calls for)")
    args = parser.parse_args(argv)

    import megacore
    from megacore.package_info import __version__

    if os.path.dirname(os.path.abspath(megacore.__file__)) != os.path.join(ROOT, "megacore"):
        print(f"error: megacore is imported from {os.path.dirname(megacore.__file__)}, not "
              f"from this checkout ({ROOT}): run `pip install -e .` here or set PYTHONPATH",
              file=sys.stderr)
        return 2

    api = current_api()
    old = load_snapshot() if os.path.exists(SNAPSHOT) else {"version": None, "api": {}}
    added, broken = diff(old["api"], api)
    if args.check:
        if old["version"] != __version__ or added or broken:
            print(f"snapshot version {old['version']}, package version {__version__}")
            for line in added:
                print(f"  + {line}")
            for line in broken:
                print(f"  - {line}")
            return 1
        print(f"public API matches the snapshot of {__version__}")
        return 0
    if old["version"] is not None:
        needed = required_bump(old["version"], added, broken)
        if not bump_is_enough(old["version"], __version__, needed):
            print(f"the API change needs a {needed} version bump from {old['version']} "
                  f"(package says {__version__}); edit megacore/package_info.py first")
            for line in added + broken:
                print(f"  {line}")
            return 1
    with open(SNAPSHOT, "w", encoding="utf-8") as f:
        json.dump({"version": __version__, "api": api}, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {SNAPSHOT} for version {__version__} "
          f"({len(added)} added, {len(broken)} removed or changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
