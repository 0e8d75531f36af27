"""Where training metrics go: a Megatron-style line on stdout, JSONL, TensorBoard, W&B.

One ``log(iteration, metrics)`` call fans the same numbers out to every sink that was
asked for. The JSONL sink writes one object per logged iteration with stable keys
(``iteration``, ``lm_loss``, ``lr``, ``grad_norm``, ``tokens_per_sec`` ...), flushed at
once so a crash loses nothing already logged. TensorBoard and W&B are optional packages:
asking for them without the package installed is an error at start-up, not a silent skip.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Optional

__all__ = ["MetricsLogger", "format_log_line"]

# metric key -> (label in the log line, format)
_LINE_FIELDS = [
    ("consumed_samples", "consumed samples", "{:12d}"),
    ("elapsed_ms_per_iteration", "elapsed time per iteration (ms)", "{:.1f}"),
    ("tokens_per_sec", "tokens/s", "{:.1f}"),
    ("tflops_per_device", "throughput per device (TFLOP/s)", "{:.4g}"),
    ("mfu", "MFU", "{:.2%}"),
    ("lr", "learning rate", "{:.6E}"),
    ("global_batch_size", "global batch size", "{:5d}"),
    ("lm_loss", "lm loss", "{:.6E}"),
    ("loss_scale", "loss scale", "{:.1f}"),
    ("grad_norm", "grad norm", "{:.3f}"),
    ("num_zeros", "num zeros", "{:.1f}"),
    ("params_norm", "params norm", "{:.3f}"),
    ("skipped_iterations", "number of skipped iterations", "{:3d}"),
    ("nan_iterations", "number of nan iterations", "{:3d}"),
    ("memory_mb", "max memory (MB)", "{:.1f}"),
]


def format_log_line(iteration: int, train_iters: Optional[int], metrics: Dict[str, float]) -> str:
    """`` [time] iteration   10/  100 | consumed samples: ... | lm loss: ... |``"""
    total = f"/{train_iters:8d}" if train_iters else ""
    parts = [f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}{total}"]
    for key, label, fmt in _LINE_FIELDS:
        value = metrics.get(key)
        if value is None:
            continue
        try:
            parts.append(f"{label}: {fmt.format(value)}")
        except (ValueError, TypeError):
            parts.append(f"{label}: {value}")
    extra = sorted(k for k in metrics if k not in {f[0] for f in _LINE_FIELDS})
    parts += [f"{k}: {metrics[k]:.6E}" if isinstance(metrics[k], float) else f"{k}: {metrics[k]}"
              for k in extra]
    return " | ".join(parts) + " |"


class MetricsLogger:
    """Fans metrics out to stdout, a JSONL file, TensorBoard and W&B (as configured)."""

    def __init__(self, *, log_jsonl: Optional[str] = None, tensorboard_dir: Optional[str] = None,
                 wandb_project: Optional[str] = None, wandb_exp_name: Optional[str] = None,
                 train_iters: Optional[int] = None, config_dict: Optional[dict] = None,
                 print_fn=print):
        self.train_iters = train_iters
        self.print_fn = print_fn
        self._jsonl = None
        if log_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(log_jsonl)), exist_ok=True)
            self._jsonl = open(log_jsonl, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                # Megatron-LM's behaviour: launch scripts pass --tensorboard-dir routinely,
                # so its absence is a warning, not a failure mid-start-up on one rank.
                print_fn(f"WARNING: --tensorboard-dir {tensorboard_dir}: the tensorboard "
                         "package is not installed (pip install tensorboard); no TensorBoard "
                         "logs will be written")
            else:
                self._tb = SummaryWriter(log_dir=tensorboard_dir)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("--wandb-project needs the wandb package "
                                   "(pip install wandb)") from e
            self._wandb = wandb.init(project=wandb_project, name=wandb_exp_name,
                                     config=config_dict or {})

    def log(self, iteration: int, metrics: Dict[str, float], *, prefix: str = "") -> None:
        clean = {k: v for k, v in metrics.items() if v is not None}
        if not prefix:
            self.print_fn(format_log_line(iteration, self.train_iters, clean))
        if self._jsonl is not None:
            record = {"iteration": iteration}
            record.update({f"{prefix}{k}": _json_number(v) for k, v in clean.items()})
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        numeric = {f"{prefix}{k}": float(v) for k, v in clean.items()
                   if isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, iteration)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=iteration)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
