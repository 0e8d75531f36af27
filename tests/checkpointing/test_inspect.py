"""read_checkpoint_info / verify_checkpoint and the tools/checkpoint/inspect.py CLI."""

import json
import os
import subprocess
import sys

import pytest

from megacore.checkpointing import read_checkpoint_info, save_checkpoint, verify_checkpoint
from tests.checkpointing import toy_model as toy
from tests.checkpointing.test_dist_checkpoint import _reference
from tests.multirank import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "tools", "checkpoint", "inspect.py")


def _save_both(root):
    chunks, opt, sched = _reference(2, 1, None)
    for fmt in ("torch", "torch_dist"):
        save_checkpoint(12, chunks, opt, sched, save_dir=f"{root}/{fmt}", ckpt_format=fmt,
                        consumed_train_samples=96, consumed_valid_samples=4,
                        config_dict={"num_layers": toy.NUM_LAYERS, "fmt": fmt})
    return True


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    run_distributed(_save_both, 2, args=(str(root),))
    return root


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_info_from_metadata(saved, fmt):
    info = read_checkpoint_info(str(saved / fmt))
    assert info.format == fmt and info.iteration == 12
    assert (info.consumed_train_samples, info.consumed_valid_samples) == (96, 4)
    assert info.config == {"num_layers": toy.NUM_LAYERS, "fmt": fmt}
    assert info.parallel_layout["tensor_model_parallel_size"] == 2
    assert info.parallel_layout["pipeline_model_parallel_size"] == 1
    assert info.megacore_version and info.checkpoint_version == 3.0
    shapes = {key: shape for key, shape, _ in info.tensors}
    if fmt == "torch_dist":  # global shapes; fc1 (stride 2) in two blocks
        assert shapes["model/embedding.weight"] == (toy.padded_vocab(2), toy.HIDDEN)
        assert shapes["model/layers.3.fc1.weight/block1"] == (toy.FFN, toy.HIDDEN)
        assert shapes["optimizer/exp_avg/layers.0.fc2.weight"] == (toy.HIDDEN, toy.FFN)
    else:  # per-rank files, local shapes
        assert shapes["mp_rank_01/model.layers.0.fc2.weight"] == (toy.HIDDEN, toy.FFN // 2)
    assert verify_checkpoint(str(saved / fmt)) == []


def _cli(*args):
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_prints_and_verifies(saved, tmp_path):
    out = _cli(str(saved / "torch_dist"), "--verify")
    assert out.returncode == 0, out.stderr
    assert "format: torch_dist" in out.stdout and "tp=2" in out.stdout
    assert "iteration: 12" in out.stdout and "verify: OK" in out.stdout
    assert "model/layers.0.fc2.weight  [8, 4]  float32" in out.stdout
    data = json.loads(_cli(str(saved / "torch"), "--json", "--no-tensors").stdout)
    assert data["format"] == "torch" and data["config"]["fmt"] == "torch"
    # Damage: truncate a DCP data file and remove a legacy rank file.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    data_file = next((broken / "torch_dist" / "iter_0000012").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:10])
    os.remove(broken / "torch" / "iter_0000012" / "mp_rank_01" / "model_optim_rng.pt")
    out = _cli(str(broken / "torch_dist"), "--verify", "--no-tensors")
    assert out.returncode == 1 and "truncated" in out.stdout
    problems = verify_checkpoint(str(broken / "torch"))
    assert len(problems) == 1 and "mp_rank_01" in problems[0] and "missing" in problems[0]
    out = _cli(str(tmp_path / "nothing"))
    assert out.returncode == 2 and "does not exist" in out.stderr
