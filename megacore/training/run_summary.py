"""What a training run tells its user at start-up: a few lines, not the whole config.

The fully resolved configuration (every field of every config, after defaults, the
checkpoint's saved settings and derived values) is written as JSON next to the run's
logs, and the console gets a short summary with the path of that file:

    megacore pretrain: GPT 4 layers, hidden 128, 4 heads (2 kv groups), seq 128, vocab
      from GPT2BPETokenizer; 8 ranks = tp 2 x pp 2 x dp 2 (cp 1, ep 1); micro-batch 4,
      global batch 8; 300 iterations; resolved configuration: out/resolved_config.json
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megacore.training.arguments import RunConfig, run_config_to_dict

__all__ = ["RESOLVED_CONFIG_FILE", "resolved_config_path", "write_resolved_config",
           "run_summary"]

RESOLVED_CONFIG_FILE = "resolved_config.json"


def resolved_config_path(run: RunConfig) -> Optional[str]:
    """Where the resolved configuration goes: the directory of ``--log-jsonl``, else
    ``--tensorboard-dir``, else ``--save``; ``None`` when the run writes nothing."""
    log = run.logging
    if log.log_jsonl:
        directory = os.path.dirname(os.path.abspath(log.log_jsonl))
    elif log.tensorboard_dir:
        directory = log.tensorboard_dir
    elif run.checkpoint.save:
        directory = run.checkpoint.save
    else:
        return None
    return os.path.join(directory, RESOLVED_CONFIG_FILE)


def write_resolved_config(run: RunConfig) -> Optional[str]:
    """Write the resolved configuration as JSON (see :func:`resolved_config_path`);
    returns the path, or ``None`` when the run has no output directory."""
    path = resolved_config_path(run)
    if path is None:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(run_config_to_dict(run), f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def run_summary(run: RunConfig, world_size: int, config_path: Optional[str]) -> str:
    """Three lines: the model, the layout and batch, the duration and where the
    resolved configuration went."""
    m, g, t = run.model, run.gpt, run.training
    groups = m.num_query_groups or m.num_attention_heads
    heads = (f"{m.num_attention_heads} heads" if groups == m.num_attention_heads
             else f"{m.num_attention_heads} heads ({groups} kv groups)")
    experts = f", {m.num_moe_experts} experts" if m.num_moe_experts else ""
    duration = (f"{t.train_iters} iterations" if t.train_iters is not None
                else f"{t.train_samples} samples")
    where = config_path or "not written (no --log-jsonl, --tensorboard-dir or --save)"
    return (f"megacore pretrain: GPT {m.num_layers} layers, hidden {m.hidden_size}, {heads}"
            f"{experts}, seq {g.seq_length}, tokenizer {run.data.tokenizer_type or 'none'}\n"
            f"  {world_size} ranks = tp {m.tensor_model_parallel_size} x pp "
            f"{m.pipeline_model_parallel_size} x cp {m.context_parallel_size} x dp "
            f"{run.data_parallel_size} (ep {m.expert_model_parallel_size}); micro-batch "
            f"{t.micro_batch_size}, global batch {t.global_batch_size}; {duration}\n"
            f"  resolved configuration: {where}")
