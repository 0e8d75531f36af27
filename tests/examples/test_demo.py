"""The README's main command, end to end: preprocess -> pretrain tp2 x pp2 -> generate.

Runs ``examples/run_demo.sh`` exactly as the README does (after the install step), into
a temporary output directory. The script itself fails unless the training loss falls
clearly; here we also check every output it promises.
"""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_readme_main_command_runs_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_OUTPUT=str(tmp_path / "demo"))
    proc = subprocess.run(["bash", "examples/run_demo.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    out = tmp_path / "demo"
    assert (out / "data" / "demo_text_document.bin").stat().st_size > 100_000
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "300"
    records = [json.loads(line) for line in open(out / "train_log.jsonl")]
    losses = [r["lm_loss"] for r in records if "lm_loss" in r]
    assert len(losses) == 30 and losses[-1] < 0.8 * losses[0]
    # Both prompts were continued (the text after each prompt is not empty).
    assert proc.stdout.count("--- prompt:") == 2
    assert "saved checkpoint at iteration 300" in proc.stdout
