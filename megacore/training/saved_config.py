"""The run configuration a checkpoint carries, merged into the flags of a new run.

A checkpoint saves its resolved run configuration (:func:`run_config_to_dict`). On
``--load``, the settings that define its weights and vocabulary
(:data:`CHECKPOINT_MODEL_FLAGS`) come from it: a flag not given takes the saved value, a
flag given with another value is an error naming both. Older saved configs are read under
renamed field names first (:func:`upgrade_saved_config`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from megacore.deprecation import DeprecatedFlag, warn_deprecated
from megacore.training.flag_error import FlagError
from megacore.training.flag_values import parse_moe_layer_freq, parse_window_size
from megacore.training.megatron_flags import FLAGS, flag_dest

__all__ = ["CHECKPOINT_MODEL_FLAGS", "upgrade_saved_config", "model_flags_from_config",
           "merge_checkpoint_config", "DEPRECATED_FIELDS"]

DEPRECATED_FIELDS: List[DeprecatedFlag] = []
"""Renamed config fields, as ``DeprecatedFlag("section.old", "section.new", ...)``: a run
configuration saved in a checkpoint under the old name is read under the new one."""

CHECKPOINT_MODEL_FLAGS = (
    "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
    "--num-query-groups", "--kv-channels", "--normalization", "--norm-epsilon",
    "--apply-layernorm-1p",
    "--swiglu", "--disable-bias-linear", "--add-qkv-bias", "--qk-layernorm",
    "--openai-gelu", "--window-size", "--use-rope-scaling", "--rope-scaling-factor",
    "--rope-scaling-low-freq-factor", "--rope-scaling-high-freq-factor",
    "--rope-scaling-original-max-position-embeddings",
    "--apply-residual-connection-post-layernorm", "--max-position-embeddings",
    "--position-embedding-type", "--rotary-percent", "--rotary-base",
    "--untie-embeddings-and-output-weights", "--make-vocab-size-divisible-by",
    "--num-experts", "--moe-ffn-hidden-size", "--moe-router-topk", "--moe-layer-freq",
    "--moe-shared-expert-intermediate-size", "--moe-shared-expert-gate", "--moe-grouped-gemm",
    "--tokenizer-type", "--vocab-file", "--merge-file", "--tokenizer-model", "--vocab-size",
    "--multi-latent-attention", "--q-lora-rank", "--kv-lora-rank", "--qk-head-dim",
    "--qk-pos-emb-head-dim", "--v-head-dim", "--mtp-num-layers", "--moe-router-num-groups",
    "--moe-router-group-topk", "--moe-router-score-function", "--moe-router-topk-scaling-factor",
    "--moe-router-enable-expert-bias", "--moe-router-pre-softmax", "--rotary-interleaved",
    "--rope-type", "--rotary-scaling-factor", "--mscale", "--mscale-all-dim",
    "--yarn-original-max-position-embeddings", "--yarn-beta-fast", "--yarn-beta-slow",
)
"""Flags that define a checkpoint's weights and vocabulary: read from its saved config."""

_CHECKPOINT_DEFAULT_FLAGS = ("--seq-length",)
"""Filled from the saved config when not given, but free to change (e.g. fine-tuning on
shorter sequences)."""

_CHECKPOINT_RESUME_FLAGS = ("--micro-batch-size", "--global-batch-size", "--rampup-batch-size")
"""The batch schedule of a resumed run (not --finetune): the checkpoint's when not given
(its consumed-samples count and lr schedule are in these units); a different value given
is used and reported, naming the flag."""


def upgrade_saved_config(config: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """A saved run configuration with renamed fields (:data:`DEPRECATED_FIELDS`) moved to
    their new names; the input is not modified."""
    out = {section: dict(values) for section, values in config.items()
           if isinstance(values, dict)}
    for row in DEPRECATED_FIELDS:
        (old_section, old), (new_section, new) = (row.flag.split("."),
                                                  row.replacement.split("."))
        if old in out.get(old_section, {}):
            warn_deprecated(f"saved config field {row.flag}", since=row.since,
                            removed_in=row.removed_in, alternative=row.replacement)
            out.setdefault(new_section, {})[new] = out[old_section].pop(old)
    return out


def _config_values(config: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """argparse destinations -> values for :data:`CHECKPOINT_MODEL_FLAGS`."""
    config = upgrade_saved_config(config)
    by_flag = {f.flag: f for f in FLAGS}
    model = config.get("model", {})
    out: Dict[str, Any] = {}
    for name in CHECKPOINT_MODEL_FLAGS:
        flag = by_flag[name]
        if name == "--swiglu":
            out["swiglu"] = bool(model.get("gated_linear_unit")) and \
                model.get("activation_func", "silu") == "silu"
            continue
        if name == "--openai-gelu":  # converters also record it as "gelu_tanh"
            out["openai_gelu"] = model.get("activation_func") == "openai_gelu" or \
                (config.get("conversion") or {}).get("activation") == "gelu_tanh"
            continue
        if name == "--window-size":
            if model.get("window_size") is not None:
                out["window_size"] = list(model["window_size"])
            continue
        if name == "--moe-layer-freq":
            if model.get("num_moe_experts"):
                out["moe_layer_freq"] = model.get("moe_layer_freq", 1)
            continue
        value = config.get(flag.section, {}).get(flag.field)
        if value is None:
            continue
        out[flag_dest(flag)] = (not value) if flag.invert else value
    return out


def model_flags_from_config(config: Dict[str, Dict[str, Any]]) -> List[str]:
    """Command-line flags reproducing a saved configuration's model and tokenizer."""
    by_dest = {flag_dest(f): f for f in FLAGS}
    argv: List[str] = []
    for dest, value in _config_values(config).items():
        flag = by_dest.get(dest) or next(f for f in FLAGS if f.field == dest)
        if isinstance(value, bool):
            argv += [flag.flag] if value else []
        elif flag.nargs is not None and isinstance(value, (list, tuple)):
            argv += [flag.flag] + [str(v) for v in value]
        elif isinstance(value, list):
            argv += [flag.flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag.flag, str(value)]
    return argv


def _merge_resume_flags(values: Dict[str, Any], merged: Dict[str, Any],
                        config: Dict[str, Any], path: str, notes: List[str]) -> None:
    if values.get("finetune"):
        return
    by_flag = {f.flag: f for f in FLAGS}
    for name in _CHECKPOINT_RESUME_FLAGS:
        flag = by_flag[name]
        saved = config.get(flag.section, {}).get(flag.field)
        if saved is None:
            continue
        dest = flag_dest(flag)
        if dest not in values:
            merged[dest] = saved
            notes.append(f"{name} {_flag_text(saved)}: taken from the checkpoint {path}")
        elif _flag_text(values[dest]) != _flag_text(saved):
            notes.append(f"WARNING: {name} {_flag_text(values[dest])} differs from the "
                         f"checkpoint's {_flag_text(saved)} ({path}); using "
                         f"{_flag_text(values[dest])}")


def _flag_text(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def merge_checkpoint_config(values: Dict[str, Any], config: Dict[str, Any],
                            path: str, notes: Optional[List[str]] = None) -> Dict[str, Any]:
    """``values`` (argparse destinations) with the checkpoint's saved ``config`` merged in:
    its model and tokenizer (:data:`CHECKPOINT_MODEL_FLAGS`) fill flags not given, and a
    flag given with another value is an error (or, with ``--use-checkpoint-args``, replaced
    with a warning in ``notes``); --seq-length, precision and a resumed run's batch schedule
    follow the checkpoint unless given."""
    merged = dict(values)
    by_dest = {flag_dest(f): f.flag for f in FLAGS}
    for dest, saved in _config_values(config).items():
        if dest not in values:
            if saved is not False:
                merged[dest] = saved
            continue
        given = values[dest]
        if dest == "moe_layer_freq":
            given = parse_moe_layer_freq(given)
        if dest == "window_size":
            given, saved = parse_window_size(given), tuple(saved)
        if given != saved and values.get("use_checkpoint_args"):
            merged[dest] = saved
            if notes is not None:
                notes.append(f"WARNING: {by_dest[dest]} {given}: replaced by the value {saved} "
                             f"saved in {path} (--use-checkpoint-args)")
        elif given != saved:
            raise FlagError(
                f"{by_dest[dest]} {given} does not match the value {saved} saved in {path}; "
                f"drop the flag (or add --use-checkpoint-args) to use the checkpoint's, or "
                "convert the checkpoint", by_dest[dest])
    by_flag = {f.flag: f for f in FLAGS}
    for name in _CHECKPOINT_DEFAULT_FLAGS:
        flag = by_flag[name]
        saved = config.get(flag.section, {}).get(flag.field)
        if saved is not None and flag_dest(flag) not in merged:
            merged[flag_dest(flag)] = saved
    for dtype in ("fp16", "bf16"):  # precision follows the checkpoint unless chosen here
        if config.get("model", {}).get(dtype) and not (values.get("fp16") or values.get("bf16")):
            merged[dtype] = True
    _merge_resume_flags(values, merged, config, path, notes if notes is not None else [])
    return merged
