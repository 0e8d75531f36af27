"""Every versioned surface is pinned: command lines, run-config schema, HTTP API, checkpoint
format (the Python API has tests/test_api.py). A change fails until the snapshot, the
version and the CHANGELOG move together; deprecated flags warn with their removal version.
"""

import dataclasses
import json
import os
import shutil

import pytest
from pydantic import BaseModel, ConfigDict

import megacore
from megacore import surfaces
from megacore.deprecation import DeprecatedFlag, MegacoreDeprecationWarning
from megacore.inference import api_schema
from megacore.training import argument_parser, arguments, saved_config
from megacore.training.training_config import TrainingArgs
from tools import api_snapshot

ROOT = api_snapshot.ROOT
GATED = ["cli", "config", "http", "checkpoint"]


@pytest.mark.parametrize("name", GATED)
def test_snapshot_matches_the_code(name):
    problems = api_snapshot.check([name], megacore.__version__)
    assert not problems, (
        "a versioned surface changed: bump megacore/package_info.py as semver requires and "
        "run `python tools/api_snapshot.py --update` (it writes the CHANGELOG notes)\n"
        + "\n".join(problems))


def test_changelog_lists_every_recorded_surface_change():
    assert api_snapshot.missing_release_notes() == {}


def test_every_program_answers_help_with_a_parser():
    cli = api_snapshot.read("cli")["surface"]
    assert set(cli) == set(surfaces.programs(ROOT))
    assert "--lr" in cli["examples/pretrain_gpt.py"]
    assert cli["examples/pretrain_gpt.py"]["--lr-decay-style"]["field_default"] == "linear"


# -- each kind of change fails its gate until version, snapshot and CHANGELOG move -----------
@pytest.fixture
def repo(tmp_path):
    """A copy of the snapshots and CHANGELOG to run the gate on."""
    for name in surfaces.SURFACES:
        rel = surfaces.SURFACES[name].snapshot
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tmp_path / rel)
    shutil.copy(os.path.join(ROOT, "CHANGELOG.md"), tmp_path / "CHANGELOG.md")
    return tmp_path


def _with_extract(monkeypatch, name, extract):
    monkeypatch.setitem(surfaces.SURFACES, name,
                        dataclasses.replace(surfaces.SURFACES[name], extract=extract))


def _committed(name):
    return json.loads(json.dumps(api_snapshot.read(name)["surface"]))


def _gate_fails_then_passes(repo, name, expected_line):
    version = megacore.__version__
    problems = api_snapshot.check([name], version, root=repo)
    assert any(expected_line in p for p in problems), problems
    major, minor, _ = (int(v) for v in version.split("."))
    refused = api_snapshot.update([name], f"{major}.{minor}.9", root=repo)  # patch: too small
    assert refused and "needs a minor version bump" in refused[0]
    assert api_snapshot.check([name], version, root=repo)  # nothing was written
    bumped = f"{major}.{minor + 1}.0"
    assert api_snapshot.update([name], bumped, root=repo) == []
    assert api_snapshot.check([name], bumped, root=repo) == []
    changelog = (repo / "CHANGELOG.md").read_text()
    assert f"## {bumped}" in changelog and expected_line in changelog
    assert api_snapshot.missing_release_notes(repo) == {}


def test_changing_a_flag_default_fails_the_cli_gate(repo, monkeypatch):
    cli = _committed("cli")
    cli["tools/checkpoint/convert.py"]["--ckpt-format"]["default"] = "torch"
    _with_extract(monkeypatch, "cli", lambda root: cli)
    _gate_fails_then_passes(repo, "cli", 'tools/checkpoint/convert.py/--ckpt-format/default: '
                                          '"torch_dist" -> "torch"')


def test_changing_a_config_default_fails_the_config_gate(repo, monkeypatch):
    # A real code change: the dataclass field's default, read by the real extractor.
    field = TrainingArgs.__dataclass_fields__["micro_batch_size"]
    monkeypatch.setattr(field, "default", field.default + 1)
    _gate_fails_then_passes(repo, "config", "training/micro_batch_size/default")


def test_renaming_a_config_field_fails_the_config_gate(repo, monkeypatch):
    config = _committed("config")
    config["training"]["micro_batch"] = config["training"].pop("micro_batch_size")
    _with_extract(monkeypatch, "config", lambda root: config)
    _gate_fails_then_passes(repo, "config", "training/micro_batch_size/type (removed)")


def test_removing_an_http_field_fails_the_http_gate(repo, monkeypatch):
    # A real code change: the health response loses a field.
    class Health(BaseModel):
        model_config = ConfigDict(extra="forbid", title="HealthResponse")
        status: str
        queued: int

    monkeypatch.setattr(api_schema, "HealthResponse", Health)
    _gate_fails_then_passes(repo, "http", "HealthResponse/properties/batches")


def test_renaming_a_checkpoint_key_fails_the_checkpoint_gate(repo, monkeypatch):
    ckpt = _committed("checkpoint")
    tree = ckpt["torch"]["iter_0000001/mp_rank_00/model_optim_rng.pt"]
    tree["weights"] = tree.pop("model")
    _with_extract(monkeypatch, "checkpoint", lambda root: ckpt)
    _gate_fails_then_passes(repo, "checkpoint", "model_optim_rng.pt/model/")


def test_growing_choices_is_an_addition_and_new_required_fields_break():
    added, broken = surfaces.diff_surface({"f": {"choices": ["a"]}}, {"f": {"choices": ["a", "b"]}})
    assert added and not broken
    added, broken = surfaces.diff_surface({"f": {"choices": ["a", "b"]}}, {"f": {"choices": ["a"]}})
    assert broken
    added, broken = surfaces.diff_surface({"s": {"required": ["a"]}}, {"s": {"required": ["a", "b"]}})
    assert broken and not added


# -- deprecated flags and config fields ----------------------------------------------------
ARGV = ("--num-layers 2 --hidden-size 16 --num-attention-heads 2 --seq-length 8 "
        "--max-position-embeddings 8 --micro-batch-size 1 --train-iters 1 --mock-data "
        "--vocab-size 32").split()
RENAMED = DeprecatedFlag("--learning-rate", "--lr", since="0.2.0", removed_in="0.4.0")


def test_a_deprecated_flag_still_works_and_warns_with_its_removal_version(monkeypatch, tmp_path):
    monkeypatch.setattr(argument_parser, "DEPRECATED_FLAGS", [RENAMED])
    for form in (["--learning-rate", "0.25"], ["--learning-rate=0.25"]):
        with pytest.warns(MegacoreDeprecationWarning,
                          match=r"--learning-rate .*removed in 0\.4\.0; use --lr"):
            assert arguments.parse_args(ARGV + form).optimizer.lr == 0.25
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 0.5\n")
    with pytest.warns(MegacoreDeprecationWarning, match="removed in 0.4.0"):
        assert arguments.parse_args(ARGV + ["--yaml-cfg", str(yaml_file)]).optimizer.lr == 0.5
    assert "--learning-rate -> --lr (removed in 0.4.0)" in " ".join(
        arguments.build_parser().format_help().split())
    with pytest.raises(SystemExit):  # an unknown flag is still an error
        arguments.parse_args(ARGV + ["--learning-rat", "0.1"])


def test_deprecation_policy_is_enforced():
    with pytest.raises(ValueError, match="at least 2 minor versions"):
        DeprecatedFlag("--a", "--b", since="0.2.0", removed_in="0.3.0").check_policy("0.2.0")
    with pytest.raises(RuntimeError, match="still exists"):
        RENAMED.check_policy("0.4.0")
    RENAMED.check_policy("0.3.5")


def test_a_renamed_config_field_is_read_from_an_old_checkpoint(monkeypatch):
    monkeypatch.setattr(saved_config, "DEPRECATED_FIELDS", [
        DeprecatedFlag("model.num_layers_old", "model.num_layers", "0.2.0", "0.4.0")])
    with pytest.warns(MegacoreDeprecationWarning, match="model.num_layers_old"):
        upgraded = arguments.upgrade_saved_config({"model": {"num_layers_old": 3}})
    assert upgraded == {"model": {"num_layers": 3}}
