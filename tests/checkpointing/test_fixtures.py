"""Checkpoints written by every earlier release resume with the current code.

``tests/fixtures/checkpoints/<version>/<case>/`` holds a tiny checkpoint saved at
iteration 3 by megacore ``<version>`` (legacy ``torch`` and ``torch_dist``, dense and MoE,
with Adam state) and ``expected.json``: the losses and grad norms of iterations 4-5 that
the same release computed when resuming it (``make_fixtures.py``). Resuming with today's
code must give the same numbers. Dropout is 0 and the data is seeded mock data, so they
depend only on what the checkpoint stores; the tolerance (rtol 1e-5) covers float32
kernel differences between CPU instruction sets (avx2 vs avx512 agree to ~1e-7 here), not
a change of meaning.
"""

import json
import os
import shlex
import shutil

import pytest

from tests.multirank import run_distributed
from tests.training.test_pretrain_gpt import _run_pretrain

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fixtures", "checkpoints")
CASES = sorted(os.path.relpath(os.path.dirname(os.path.join(root, "expected.json")), FIXTURES)
               for root, _, files in os.walk(FIXTURES) if "expected.json" in files)


def test_fixtures_exist_for_the_first_release():
    assert {"0.1.0/torch_dense", "0.1.0/torch_moe", "0.1.0/torch_dist_dense",
            "0.1.0/torch_dist_moe"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_old_checkpoint_resumes_with_recorded_losses(tmp_path, case):
    with open(os.path.join(FIXTURES, case, "expected.json"), encoding="utf-8") as f:
        expected = json.load(f)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, case, "ckpt"), ckpt)  # the fixture stays pristine
    log = tmp_path / "resume.jsonl"
    argv = shlex.split(expected["flags"]) + ["--load", str(ckpt), "--log-jsonl", str(log)]
    run_distributed(_run_pretrain, 1, args=(argv,), timeout=240)
    with open(log, encoding="utf-8") as f:
        got = [r for r in map(json.loads, f) if "lm_loss" in r]
    want = expected["resumed"]
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for g, w in zip(got, want):
        assert g["lm_loss"] == pytest.approx(w["lm_loss"], rel=1e-5), (case, g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), (case, g, w)


def _format_version(case):
    import glob

    import torch

    ckpt = os.path.join(FIXTURES, case, "ckpt")
    path = (glob.glob(os.path.join(ckpt, "iter_*", "common.pt"))
            or glob.glob(os.path.join(ckpt, "iter_*", "mp_rank_*", "model_optim_rng.pt")))[0]
    return torch.load(path, map_location="cpu", weights_only=True)["checkpoint_version"]


def test_the_current_format_version_has_fixtures():
    """A format change (a new CHECKPOINT_VERSION) must add fixtures written by it, beside
    the old ones that the loader keeps upgrading (make_fixtures.py)."""
    from megacore.checkpointing import CHECKPOINT_VERSION

    assert CHECKPOINT_VERSION in {_format_version(case) for case in CASES}, (
        f"no fixture was written with checkpoint format {CHECKPOINT_VERSION}: run "
        "tests/fixtures/checkpoints/make_fixtures.py after bumping the package version")
