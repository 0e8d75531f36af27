"""From parsed flag values to the typed configs of a :class:`RunConfig`.

The values are argparse destinations (``{"lr": 1e-3, "swiglu": True}``), from the command
line, a ``--yaml-cfg`` file and a checkpoint's saved config. A flag copied into one field
goes straight to its section (:func:`section_kwargs`); Megatron-LM's aliases and the flags
that set several fields or need arithmetic are turned into fields here
(``--swiglu`` -> ``gated_linear_unit`` + SiLU). A bad value raises
:class:`~megacore.training.flag_error.FlagError` naming its flags.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from megacore.config_error import FieldError
from megacore.training.flag_error import FlagError
from megacore.training.megatron_flags import FLAGS, NO_EFFECT, SECTIONS, flag_dest, flags_of_fields
from megacore.training.run_config import RunConfig
from megacore.transformer import AttnBackend
from megacore.transformer.activations import openai_gelu

__all__ = ["build_run_config", "section_kwargs", "derive_notes", "parse_window_size",
           "parse_moe_layer_freq"]

_PER_STAGE = "--num-layers-per-virtual-pipeline-stage"


def section_kwargs(values: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{section: {field: value}}`` for the flags that are copied into one field."""
    kwargs: Dict[str, Dict[str, Any]] = {name: {} for name in SECTIONS}
    for flag in FLAGS:
        dest = flag_dest(flag)
        if flag.derived or dest not in values:
            continue
        value = values[dest]
        if flag.invert:
            value = not value
        kwargs[flag.section][flag.field] = value
    return kwargs


def derive_notes(values: Dict[str, Any]) -> List[str]:
    """Start-up lines for flags given that change nothing here, in one line."""
    no_effect = [f.flag for f in FLAGS if f.kind == NO_EFFECT and flag_dest(f) in values]
    notes = []
    if no_effect:
        notes.append("megacore: accepted with no effect on this backend (kernel/fusion "
                     "choices, see docs/megatron_flags.md): " + ", ".join(no_effect))
    if _sequence_parallel_without_tp(values):
        notes.append("WARNING: --sequence-parallel needs --tensor-model-parallel-size > 1; "
                     "disabled (as Megatron-LM does)")
    tokenizer = values.get("tokenizer_type")
    if values.get("tiktoken_pattern") and tokenizer != "TikTokenizer":
        notes.append(f"megacore: --tiktoken-pattern has no effect with --tokenizer-type "
                     f"{tokenizer} (it is TikTokenizer's)")
    return notes


def _sequence_parallel_without_tp(values: Dict[str, Any]) -> bool:
    return bool(values.get("sequence_parallel")) and \
        int(values.get("tensor_model_parallel_size") or 1) == 1


def _derive_megatron_aliases(values: Dict[str, Any], kw: Dict[str, Dict[str, Any]]) -> None:
    """Megatron-LM flags that are other names for megacore settings, and Megatron-LM's
    lenient rules (sequence parallelism at tp 1 is turned off, default tokenizer)."""
    model, data = kw["model"], kw["data"]
    if _sequence_parallel_without_tp(values):
        model["sequence_parallel"] = False
    if values.get("recompute_activations"):
        if model.get("recompute_granularity", "selective") != "selective":
            raise FlagError(
                "--recompute-activations means --recompute-granularity selective; it "
                f"contradicts --recompute-granularity {model['recompute_granularity']}",
                "--recompute-activations", "--recompute-granularity")
        model["recompute_granularity"] = "selective"
    if values.get("use_flash_attn"):
        backend = model.get("attention_backend", AttnBackend.flash)
        if _backend_name(backend) != "flash":
            raise FlagError(
                f"--use-flash-attn contradicts --attention-backend {_backend_name(backend)}",
                "--use-flash-attn", "--attention-backend")
        model["attention_backend"] = AttnBackend.flash
    if "tokenizer_type" not in data and data.get("vocab_file") and data.get("merge_file"):
        data["tokenizer_type"] = "GPT2BPETokenizer"  # Megatron's default for vocab + merges
    bf16 = bool(values.get("bf16"))
    if values.get("grad_reduce_in_bf16"):
        if not bf16:
            raise FlagError("--grad-reduce-in-bf16 needs --bf16", "--grad-reduce-in-bf16",
                            "--bf16")
        if values.get("accumulate_allreduce_grads_in_fp32"):
            raise FlagError("--grad-reduce-in-bf16 contradicts "
                            "--accumulate-allreduce-grads-in-fp32", "--grad-reduce-in-bf16",
                            "--accumulate-allreduce-grads-in-fp32")
    elif bf16:
        kw["ddp"]["grad_reduce_in_fp32"] = True  # Megatron's default for bf16


def _backend_name(backend: Any) -> str:
    return backend.name if isinstance(backend, AttnBackend) else str(backend)


def _derive(values: Dict[str, Any], kw: Dict[str, Dict[str, Any]]) -> None:
    """Flags that set several fields or need arithmetic."""
    _derive_megatron_aliases(values, kw)
    _derive_activation(values, kw["model"])
    _derive_precision(values, kw)
    model = kw["model"]
    if values.get("window_size") is not None:
        model["window_size"] = parse_window_size(values["window_size"])
    if values.get("use_distributed_optimizer"):
        kw["ddp"]["use_distributed_optimizer"] = True
    if values.get("check_for_nan_in_loss_and_grad") and \
            values.get("no_check_for_nan_in_loss_and_grad"):
        raise FlagError("--check-for-nan-in-loss-and-grad and "
                        "--no-check-for-nan-in-loss-and-grad contradict each other",
                        "--check-for-nan-in-loss-and-grad", "--no-check-for-nan-in-loss-and-grad")
    if values.get("group_query_attention") and "num_query_groups" not in model:
        raise FlagError("--group-query-attention needs --num-query-groups",
                        "--group-query-attention", "--num-query-groups")
    _derive_virtual_stages(values, model)
    if values.get("attention_backend") is not None:
        model["attention_backend"] = AttnBackend[values["attention_backend"]]
    freq = values.get("moe_layer_freq")  # the flag's argparse destination
    if freq is not None:
        model["moe_layer_freq"] = parse_moe_layer_freq(freq)
    if model.get("virtual_pipeline_model_parallel_size") == 1:
        model["virtual_pipeline_model_parallel_size"] = None


def _derive_activation(values: Dict[str, Any], model: Dict[str, Any]) -> None:
    """--swiglu (gated SiLU) and --openai-gelu (tanh GeLU): alternatives."""
    if values.get("swiglu"):
        model["gated_linear_unit"] = True
        model["activation_func"] = F.silu
    if values.get("openai_gelu"):
        if values.get("swiglu"):
            raise FlagError("--openai-gelu and --swiglu are alternatives "
                            "(tanh GeLU vs gated SiLU); give one", "--openai-gelu", "--swiglu")
        model["activation_func"] = openai_gelu


def _derive_precision(values: Dict[str, Any], kw: Dict[str, Dict[str, Any]]) -> None:
    """--fp16 / --bf16: the dtypes of the model and the optimizer."""
    fp16, bf16 = bool(values.get("fp16")), bool(values.get("bf16"))
    if fp16 and bf16:
        raise FlagError("--fp16 and --bf16 are mutually exclusive", "--fp16", "--bf16")
    if bf16 and values.get("use_torch_fsdp2"):
        # FSDP2's mixed precision: fp32 master weights (the optimizer updates them
        # directly), bf16 compute and bf16 activations between pipeline stages.
        kw["model"].update(bf16=True, params_dtype=torch.float32, pipeline_dtype=torch.bfloat16)
    elif fp16 or bf16:
        dtype = torch.float16 if fp16 else torch.bfloat16
        for section in ("model", "optimizer"):
            kw[section].update(fp16=fp16, bf16=bf16, params_dtype=dtype)


def _derive_virtual_stages(values: Dict[str, Any], model: Dict[str, Any]) -> None:
    """--num-layers-per-virtual-pipeline-stage -> virtual stages per pipeline rank;
    --pipeline-schedule zbv runs two (the V), so that is its default."""
    per_stage = values.get("num_layers_per_virtual_pipeline_stage")
    if per_stage is None:
        if model.get("pipeline_schedule") == "zbv" and \
                model.get("pipeline_model_parallel_size", 1) > 1:
            model.setdefault("virtual_pipeline_model_parallel_size", 2)
        return
    if "virtual_pipeline_model_parallel_size" in model:
        raise FlagError(
            "--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank"
            " are alternatives; give one", _PER_STAGE, "--num-virtual-stages-per-pipeline-rank")
    pp = model.get("pipeline_model_parallel_size", 1)
    layers = model.get("num_layers", 0)
    if pp < 2:
        raise FlagError(
            "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1",
            _PER_STAGE, "--pipeline-model-parallel-size")
    if per_stage < 1 or layers % (pp * per_stage):
        raise FlagError(
            f"--num-layers {layers} must be divisible by --pipeline-model-parallel-size {pp} "
            f"x --num-layers-per-virtual-pipeline-stage {per_stage}", "--num-layers",
            "--pipeline-model-parallel-size", _PER_STAGE)
    model["virtual_pipeline_model_parallel_size"] = layers // (pp * per_stage)


def parse_window_size(value) -> tuple:
    """``--window-size``: ``LEFT RIGHT`` or Megatron's ``LEFT,RIGHT`` -> ``(left, right)``."""
    items = value if isinstance(value, (list, tuple)) else [value]
    parts = [p for item in items for p in str(item).strip("()[] ").split(",") if p.strip()]
    try:
        window = tuple(int(p) for p in parts)
    except ValueError:
        window = ()
    if len(window) != 2:
        raise FlagError(f"--window-size {value!r}: expected two integers "
                        "LEFT RIGHT (or LEFT,RIGHT), e.g. 4095 0", "--window-size")
    return window


def parse_moe_layer_freq(text) -> Any:
    """``--moe-layer-freq``: ``2`` (every 2nd layer) or a 0/1 pattern ``1,0,1,0`` /
    ``[1,0,1,0]`` (one entry per layer)."""
    if isinstance(text, (int, list)):
        return text
    cleaned = str(text).strip().strip("[]")
    try:
        values = [int(v) for v in cleaned.split(",") if v.strip()]
    except ValueError:
        raise FlagError(f"--moe-layer-freq {text!r}: expected an integer or a "
                        "comma-separated 0/1 pattern such as 1,0,1,0", "--moe-layer-freq") from None
    if len(values) == 1 and "," not in cleaned:
        return values[0]
    return values


def _build_section(name: str, kwargs: Dict[str, Any]):
    cls = SECTIONS[name]
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise FlagError(f"invalid {name} settings: {e}", *flags_of_fields(name, e.fields),
                        named=False) from e
    except (ValueError, TypeError) as e:
        raise FlagError(f"invalid {name} settings: {e}") from e


def build_run_config(values: Dict[str, Any]) -> RunConfig:
    """The typed configs of the flag values ``values`` (argparse destinations); each
    config's ``__post_init__`` checks its own fields. Nothing is derived across configs
    here (:mod:`~megacore.training.config_checks` does that)."""
    kw = section_kwargs(values)
    _derive(values, kw)
    for key in ("rampup_batch_size",):
        if key in kw["training"]:
            kw["training"][key] = [int(v) for v in kw["training"][key]]
    schedule = kw["training"].get("step_batch_size_schedule")
    if isinstance(schedule, (list, tuple)):  # one quoted word, or (bash arrays) several
        kw["training"]["step_batch_size_schedule"] = " ".join(schedule)
    built = {name: _build_section(name, kw[name]) for name in SECTIONS}
    return RunConfig(**built)
