"""The public API is versioned: snapshot test, semver rule and deprecation helper."""

import re
import warnings

import pytest

import megacore
from megacore.deprecation import MegacoreDeprecationWarning, deprecated, parse_version
from tools import api_snapshot


def test_version_is_semver():
    assert re.fullmatch(r"\d+\.\d+\.\d+([a-z]+\d*)?", megacore.__version__)


def test_public_api_matches_snapshot():
    snapshot = api_snapshot.load_snapshot()
    added, broken = api_snapshot.diff(snapshot["api"], api_snapshot.current_api())
    assert not (added or broken), (
        "the public API changed without updating the snapshot: bump megacore/package_info.py "
        "as semver requires and run `python tools/api_snapshot.py --update`.\n"
        + "\n".join(["added: " + a for a in added] + ["removed/changed: " + b for b in broken]))
    assert snapshot["version"] == megacore.__version__, (
        f"snapshot is for {snapshot['version']} but the package is {megacore.__version__}: "
        "run `python tools/api_snapshot.py --update` in the same commit as the bump")


def test_every_public_module_declares_all():
    for name in api_snapshot.public_modules():
        module = __import__(name, fromlist=["_"])
        assert hasattr(module, "__all__"), f"{name} has no __all__"
        for exported in module.__all__:
            assert hasattr(module, exported), f"{name}.__all__ names missing {exported!r}"


def test_semver_rule():
    old = {"m": {"f": {"kind": "function", "signature": "(a)"}}}
    same = {"m": {"f": {"kind": "function", "signature": "(a)"}}}
    grown = {"m": {"f": {"kind": "function", "signature": "(a)"},
                   "g": {"kind": "function", "signature": "()"}}}
    changed = {"m": {"f": {"kind": "function", "signature": "(a, b)"}}}
    assert api_snapshot.diff(old, same) == ([], [])
    added, broken = api_snapshot.diff(old, grown)
    assert added == ["m.g"] and not broken
    assert api_snapshot.required_bump("1.2.0", added, broken) == "minor"
    added, broken = api_snapshot.diff(old, changed)
    assert broken == ["m.f (changed)"]
    assert api_snapshot.required_bump("1.2.0", added, broken) == "major"
    assert api_snapshot.required_bump("0.2.0", added, broken) == "minor"
    assert not api_snapshot.bump_is_enough("1.2.0", "1.3.0", "major")
    assert api_snapshot.bump_is_enough("1.2.0", "2.0.0", "major")
    assert not api_snapshot.bump_is_enough("1.2.0", "1.2.1", "minor")


def test_deprecated_function_warns_with_removal_version():
    @deprecated(since="0.1.0", removed_in="99.0.0", alternative="new_fn")
    def old_fn(x):
        return x + 1

    with pytest.warns(MegacoreDeprecationWarning, match=r"removed in 99\.0\.0; use new_fn"):
        assert old_fn(1) == 2


def test_deprecated_class_warns():
    @deprecated(since="0.1.0", removed_in="99.0.0")
    class Old:
        def __init__(self, v):
            self.v = v

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert Old(3).v == 3
    assert any(issubclass(w.category, MegacoreDeprecationWarning) for w in caught)


def test_deprecation_past_its_removal_version_fails_loudly():
    with pytest.raises(RuntimeError, match="still exists"):
        deprecated(since="0.0.1", removed_in="0.1.0", current_version="0.1.0")
    assert parse_version("1.10.2rc1") == (1, 10, 2)
