#!/usr/bin/env python
"""Snapshots of megacore's versioned surfaces, and the semver rule for them.

    python tools/api_snapshot.py --check              # exit 1 and list what changed
    python tools/api_snapshot.py --update             # rewrite the snapshots + CHANGELOG notes
    python tools/api_snapshot.py --check --surface cli

Surfaces (see :mod:`megacore.surfaces`): the Python API (``tests/api_snapshot.json``),
every program's command line, the run-config schema, the HTTP API (OpenAPI) and the
checkpoint format (``tests/snapshots/*.json``). ``--update`` refuses unless the version in
``megacore/package_info.py`` was bumped enough for the change (a removal or a changed
value needs a MAJOR bump, MINOR while MAJOR is 0; an addition needs a MINOR bump), then
records each surface's changes under the version and writes them into that version's
section of ``CHANGELOG.md`` (between ``<!-- surfaces -->`` markers): the release notes
come from the gates.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(ROOT, "tests", "api_snapshot.json")
CHANGELOG = os.path.join(ROOT, "CHANGELOG.md")

from megacore.surfaces import (  # noqa: E402  (re-exported: tests and older callers)
    SURFACES,
    bump_is_enough,
    public_modules,  # noqa: F401
    python_api as _python_api,
    required_bump,
)
from megacore.surfaces import diff_python_api as diff  # noqa: E402,F401


def current_api() -> dict:
    return _python_api()


def load_snapshot() -> dict:
    with open(SNAPSHOT, encoding="utf-8") as f:
        return json.load(f)


# -- one surface ------------------------------------------------------------------------------
def _content_key(name: str) -> str:
    return "api" if name == "python_api" else "surface"


def read(name: str, root: str = ROOT) -> Optional[dict]:
    path = os.path.join(root, SURFACES[name].snapshot)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def compare(name: str, current, root: str = ROOT):
    """(snapshot or None, added, broken) of ``current`` against the committed snapshot."""
    old = read(name, root)
    base = old[_content_key(name)] if old else {}
    added, broken = SURFACES[name].diff(base, current)
    return old, added, broken


def check(names: List[str], version: str, root: str = ROOT) -> List[str]:
    """Problems with the committed snapshots (empty: they match the code and version)."""
    problems = []
    for name in names:
        old, added, broken = compare(name, SURFACES[name].extract(root), root)
        title = SURFACES[name].title
        if old is None:
            problems.append(f"{title}: no snapshot at {SURFACES[name].snapshot}")
            continue
        if old["version"] != version:
            problems.append(f"{title}: snapshot is for {old['version']}, package is {version}")
        problems += [f"{title}: + {line}" for line in added]
        problems += [f"{title}: - {line}" for line in broken]
    return problems


def update(names: List[str], version: str, root: str = ROOT) -> List[str]:
    """Write the snapshots of ``names`` for ``version``; returns refusals (nothing written
    when there are any)."""
    pending, refusals = {}, []
    for name in names:
        current = SURFACES[name].extract(root)
        old, added, broken = compare(name, current, root)
        # Changes within one unreleased version are judged against the version before it.
        base = None if old is None else (
            old["version"] if old["version"] != version else old.get("base_version"))
        if base is not None:
            needed = required_bump(base, added, broken)
            if not bump_is_enough(base, version, needed):
                refusals.append(f"{SURFACES[name].title} changed: needs a {needed} version "
                                f"bump from {base} (package says {version})")
                refusals += [f"  {line}" for line in added + broken]
                continue
        changes = dict((old or {}).get("changes", {}))
        lines = [f"+ {line}" for line in added] + [f"- {line}" for line in broken]
        if lines and base is not None:  # a first snapshot has no released baseline
            changes[version] = sorted(set(changes.get(version, [])) | set(lines))
        pending[name] = {"version": version, "base_version": base,
                         _content_key(name): current, "changes": changes}
    if refusals:
        return refusals
    for name, content in pending.items():
        path = os.path.join(root, SURFACES[name].snapshot)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1, sort_keys=True)
            f.write("\n")
    write_release_notes(version, root)
    return []


# -- release notes -------------------------------------------------------------------------------
BEGIN, END = "<!-- surfaces -->", "<!-- /surfaces -->"


def release_notes(version: str, root: str = ROOT) -> str:
    """The generated block for ``version``: each surface's recorded changes."""
    parts = []
    for name, surface in SURFACES.items():
        lines = (read(name, root) or {}).get("changes", {}).get(version, [])
        if lines:
            parts.append(f"#### {surface.title}\n" + "\n".join(f"- `{line}`" for line in lines))
    body = "\n\n".join(parts) if parts else "No change to a versioned surface."
    return (f"{BEGIN}\n### Versioned surfaces (generated by `tools/api_snapshot.py`)\n\n"
            f"{body}\n{END}")


def _section(text: str, version: str):
    """(start, end) of the ``## <version>`` section of the CHANGELOG, or None."""
    match = re.search(rf"^## {re.escape(version)}\b.*$", text, re.M)
    if match is None:
        return None
    following = re.search(r"^## ", text[match.end():], re.M)
    return match.start(), match.end() + (following.start() if following else len(text) - match.end())


def write_release_notes(version: str, root: str = ROOT) -> None:
    path = os.path.join(root, "CHANGELOG.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    notes = release_notes(version, root)
    span = _section(text, version)
    if span is None:
        first = re.search(r"^## ", text, re.M)
        at = first.start() if first else len(text)
        text = text[:at] + f"## {version} (unreleased)\n\n{notes}\n\n" + text[at:]
    else:
        section = text[span[0]:span[1]]
        if BEGIN in section:
            section = re.sub(rf"{re.escape(BEGIN)}.*?{re.escape(END)}", lambda _: notes,
                             section, flags=re.S)
        else:
            section = section.rstrip("\n") + f"\n\n{notes}\n\n"
        text = text[:span[0]] + section + text[span[1]:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def missing_release_notes(root: str = ROOT) -> Dict[str, List[str]]:
    """Per version, recorded surface changes that its CHANGELOG section does not list."""
    with open(os.path.join(root, "CHANGELOG.md"), encoding="utf-8") as f:
        text = f.read()
    missing: Dict[str, List[str]] = {}
    for name in SURFACES:
        for version, lines in (read(name, root) or {}).get("changes", {}).items():
            span = _section(text, version)
            section = text[span[0]:span[1]] if span else ""
            gone = [line for line in lines if f"`{line}`" not in section]
            if gone:
                missing.setdefault(version, []).extend(gone)
    return missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true",
                      help="compare the code with the committed snapshots; exit 1 on a change")
    mode.add_argument("--update", action="store_true",
                      help="rewrite the snapshots for the package version (refuses a bump too "
                           "small for the change) and the CHANGELOG's generated notes")
    parser.add_argument("--surface", action="append", choices=sorted(SURFACES),
                        help="only this surface (repeatable; default: all)")
    args = parser.parse_args(argv)

    import megacore
    from megacore.package_info import __version__

    if os.path.dirname(os.path.abspath(megacore.__file__)) != os.path.join(ROOT, "megacore"):
        print(f"error: megacore is imported from {os.path.dirname(megacore.__file__)}, not "
              f"from this checkout ({ROOT}): run `pip install -e .` here or set PYTHONPATH",
              file=sys.stderr)
        return 2
    names = args.surface or list(SURFACES)
    if args.check:
        problems = check(names, __version__)
        for line in problems:
            print(line)
        if not problems:
            print(f"{', '.join(names)}: match the snapshots of {__version__}")
        return 1 if problems else 0
    refusals = update(names, __version__)
    for line in refusals:
        print(line)
    if not refusals:
        print(f"wrote the snapshots of {', '.join(names)} for {__version__} and the "
              f"CHANGELOG notes")
    return 1 if refusals else 0


if __name__ == "__main__":
    sys.exit(main())
