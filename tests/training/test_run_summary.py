"""What a run prints at start-up (a short summary) and writes (the resolved config), and
the checkpoint inspector's readable config."""

import json
import shlex

from megacore.checkpointing.checkpoint_info import _format_config
from megacore.training import parse_args, run_config_to_dict
from megacore.training.run_summary import run_summary, write_resolved_config

FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 8 "
         "--lr 1e-2 --train-iters 3 --mock-data --vocab-size 97 --num-query-groups 2")


def test_resolved_config_is_written_beside_the_log_and_summarized(tmp_path):
    run = parse_args(shlex.split(FLAGS + f" --log-jsonl {tmp_path / 'logs' / 'train.jsonl'}"),
                     world_size=2)
    path = write_resolved_config(run)
    assert path == str(tmp_path / "logs" / "resolved_config.json")
    with open(path) as f:
        assert json.load(f) == json.loads(json.dumps(run_config_to_dict(run)))
    summary = run_summary(run, 2, path)
    assert len(summary.splitlines()) == 3, summary
    assert "2 layers, hidden 32, 4 heads (2 kv groups), seq 16" in summary
    assert "2 ranks = tp 1 x pp 1 x cp 1 x dp 2" in summary and path in summary


def test_no_output_directory_writes_nothing():
    run = parse_args(shlex.split(FLAGS), world_size=1)
    assert write_resolved_config(run) is None
    assert "not written" in run_summary(run, 1, None)


def test_inspect_prints_the_config_in_short_lines():
    config = run_config_to_dict(parse_args(shlex.split(FLAGS), world_size=1))
    lines = _format_config(config)
    assert lines[0] == "config:" and max(map(len, lines)) <= 100
    text = " ".join(lines)
    for section, values in config.items():
        assert f"  {section}: " in "\n".join(lines)
        for key in values:
            assert f"{key}=" in text
