"""Megatron-style command-line flags, generated from the config dataclasses.

Each flag is one row of ``FLAGS``: the Megatron flag name and the config field it sets.
The parser takes type, default, choices and help text (the field's docstring) from the
dataclass, and :func:`parse_args` turns the parsed flags back into the configs at once,
returning a :class:`RunConfig`; there is no global ``args``. A ``--yaml-cfg`` file can
give the same settings (keys are field names or flag names); flags on the command line
override it. :func:`validate_run_config` rejects every inconsistent combination before
training, naming the flags involved.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import math
import re
import sys
import textwrap
import typing
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from megacore.datasets.split_and_blend import parse_and_normalize_split
from megacore.deprecation import DeprecatedFlag, rename_deprecated_flags, warn_deprecated
from megacore.distributed import DistributedDataParallelConfig
from megacore.optimizer import OptimizerConfig
from megacore.parallel_state import ParallelLayout
from megacore.training.launch_env import is_launch_rank_zero, record_for_launcher
from megacore.training.training_config import (
    CheckpointArgs,
    CompatArgs,
    DataArgs,
    GPTModelArgs,
    LoggingArgs,
    SchedulerArgs,
    TrainingArgs,
)
from megacore.transformer import AttnBackend, TransformerConfig
from megacore.transformer.activations import openai_gelu

__all__ = ["Flag", "FLAGS", "RunConfig", "ArgumentValidationError", "build_parser",
           "parse_args", "validate_run_config", "run_config_to_dict", "CHECKPOINT_MODEL_FLAGS",
           "model_flags_from_config"]

SECTIONS = {
    "model": TransformerConfig,
    "gpt": GPTModelArgs,
    "optimizer": OptimizerConfig,
    "ddp": DistributedDataParallelConfig,
    "data": DataArgs,
    "training": TrainingArgs,
    "scheduler": SchedulerArgs,
    "logging": LoggingArgs,
    "checkpoint": CheckpointArgs,
    "compat": CompatArgs,
}

# How megacore treats each Megatron-LM flag (the "class" column of docs/megatron_flags.md).
IMPLEMENTED = "implemented"  # Megatron's meaning, by the config field it sets
MAPPED = "mapped"            # onto an equivalent megacore setting (Flag.setting says which)
NO_EFFECT = "no effect"      # kernel/fusion/hardware choice: accepted, reported at start-up
NEEDS = "needs"              # needs something absent (Flag.setting): stops before training
FLAG_KINDS = (IMPLEMENTED, MAPPED, NO_EFFECT, NEEDS)


class ArgumentValidationError(ValueError):
    """An inconsistent combination of flags; the message names them."""


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag and the config field it sets.

    ``invert``: a store-true flag that sets a boolean field to False
    (``--disable-bias-linear`` -> ``add_bias_linear=False``). ``derived``: the flag is read
    by :func:`_derive` instead of being copied into a field. ``kind``: one of
    :data:`FLAG_KINDS`; ``setting`` says, for a mapped flag, the megacore setting it
    becomes, for a no-effect flag why, and for a ``needs`` flag what it needs. ``help``:
    the help text of a flag that has no field docstring to take it from (derived flags).
    """

    flag: str
    section: str
    field: str
    invert: bool = False
    derived: bool = False
    choices: Optional[Sequence[Any]] = None
    nargs: Optional[str] = None
    type: Optional[type] = None
    kind: str = IMPLEMENTED
    setting: str = ""
    help: Optional[str] = None


def _f(flag, section, field=None, **kw):
    return Flag(flag, section, field or flag.lstrip("-").replace("-", "_"), **kw)


_FP8_NEEDS = ("Transformer Engine's fp8 layers on a CUDA GPU, which megacore does not "
              "drive; drop the fp8 flags to train without fp8")


FLAGS: List[Flag] = [
    # model shape (TransformerConfig)
    _f("--num-layers", "model"), _f("--hidden-size", "model"),
    _f("--ffn-hidden-size", "model"), _f("--num-attention-heads", "model"),
    _f("--num-query-groups", "model"), _f("--kv-channels", "model"),
    _f("--group-query-attention", "model", "group_query_attention", derived=True, type=bool,
       help="Grouped-query attention: share each key/value head among several query heads "
            "(needs --num-query-groups)."),
    _f("--normalization", "model", choices=["LayerNorm", "RMSNorm"]),
    _f("--norm-epsilon", "model", "layernorm_epsilon"),
    _f("--swiglu", "model", "swiglu", derived=True, type=bool,
       help="SwiGLU MLP (Llama): a gated linear unit with SiLU activation."),
    _f("--disable-bias-linear", "model", "add_bias_linear", invert=True),
    _f("--add-qkv-bias", "model"), _f("--qk-layernorm", "model"),
    _f("--multi-latent-attention", "model"), _f("--q-lora-rank", "model"),
    _f("--mtp-num-layers", "model"), _f("--mtp-loss-scaling-factor", "model"),
    _f("--kv-lora-rank", "model"), _f("--qk-head-dim", "model"),
    _f("--qk-pos-emb-head-dim", "model"), _f("--v-head-dim", "model"),
    # YaRN for multi-latent attention (Megatron-LM's --rope-type and MLA flags; the ramp's
    # flags are Megatron's --yarn-* ones, setting MLATransformerConfig's field names)
    _f("--rope-type", "model", choices=["rope", "yarn"]),
    _f("--rotary-scaling-factor", "model"), _f("--mscale", "model"),
    _f("--mscale-all-dim", "model"),
    _f("--yarn-original-max-position-embeddings", "model", "original_max_position_embeddings"),
    _f("--yarn-beta-fast", "model", "beta_fast"), _f("--yarn-beta-slow", "model", "beta_slow"),
    _f("--openai-gelu", "model", "openai_gelu", derived=True, type=bool,
       help="GPT-2's tanh approximation of GeLU as the MLP activation (Megatron's flag; "
            "Hugging Face's gelu_new)"),
    _f("--window-size", "model", "window_size", derived=True, type=str, nargs="+"),
    _f("--hidden-dropout", "model"), _f("--attention-dropout", "model"),
    _f("--attention-backend", "model", "attention_backend", derived=True, type=str,
       choices=[b.name for b in AttnBackend]),
    _f("--layout-independent-attention-dropout", "model"),
    _f("--compile-layers", "model"),
    _f("--transformer-impl", "model", choices=["local", "transformer_engine"]),
    _f("--init-method-std", "model"),
    _f("--apply-residual-connection-post-layernorm", "model"),
    _f("--recompute-granularity", "model", choices=["full", "selective"]),
    _f("--recompute-method", "model", choices=["uniform", "block"]),
    _f("--recompute-num-layers", "model"),
    _f("--distribute-saved-activations", "model"),
    _f("--calculate-per-token-loss", "model"),
    _f("--apply-layernorm-1p", "model", "layernorm_zero_centered_gamma"),
    _f("--recompute-activations", "model", "recompute_activations", derived=True, type=bool,
       kind=MAPPED, setting="--recompute-granularity selective (Megatron's alias)"),
    _f("--use-flash-attn", "model", "use_flash_attn", derived=True, type=bool, kind=MAPPED,
       setting="attention_backend=flash: torch's scaled_dot_product_attention, which runs "
               "its flash kernel where the device has one"),
    _f("--no-masked-softmax-fusion", "model", "masked_softmax_fusion", invert=True,
       kind=NO_EFFECT, setting="fused scale-mask-softmax CUDA kernel; attention_backend "
                               "chooses megacore's kernel"),
    _f("--no-bias-gelu-fusion", "model", "bias_activation_fusion", invert=True,
       kind=NO_EFFECT, setting="jit-fused bias+GeLU kernel; same function unfused"),
    _f("--no-bias-swiglu-fusion", "model", "bias_activation_fusion", invert=True,
       kind=NO_EFFECT, setting="jit-fused bias+SwiGLU kernel; same function unfused"),
    _f("--no-persist-layer-norm", "model", "persist_layer_norm", invert=True,
       kind=NO_EFFECT, setting="Apex persistent LayerNorm kernel choice"),
    # parallelism (ModelParallelConfig part of TransformerConfig)
    _f("--tensor-model-parallel-size", "model"), _f("--pipeline-model-parallel-size", "model"),
    _f("--num-layers-per-virtual-pipeline-stage", "model", "num_layers_per_virtual_pipeline_stage",
       derived=True, type=int,
       help="Interleaved pipeline: layers per virtual stage; the number of virtual stages "
            "per rank is num_layers / (pipeline size * this). Alternative to "
            "--num-virtual-stages-per-pipeline-rank."),
    _f("--num-virtual-stages-per-pipeline-rank", "model", "virtual_pipeline_model_parallel_size"),
    _f("--decoder-first-pipeline-num-layers", "model", "num_layers_in_first_pipeline_stage"),
    _f("--decoder-last-pipeline-num-layers", "model", "num_layers_in_last_pipeline_stage"),
    _f("--pipeline-schedule", "model", choices=["1f1b", "interleaved-1f1b", "zb-h1"]),
    _f("--context-parallel-size", "model"), _f("--expert-model-parallel-size", "model"),
    _f("--expert-tensor-parallel-size", "model"),
    _f("--sequence-parallel", "model"),
    _f("--gradient-accumulation-fusion", "model"),
    _f("--no-gradient-accumulation-fusion", "model", "gradient_accumulation_fusion",
       invert=True, kind=MAPPED,
       setting="gradient_accumulation_fusion=False (megacore's default; Megatron's is on)"),
    _f("--deterministic-mode", "model"),
    _f("--fp16", "model", "fp16", derived=True, type=bool),
    _f("--bf16", "model", "bf16", derived=True, type=bool),
    # mixture of experts
    _f("--num-experts", "model", "num_moe_experts"),
    _f("--moe-ffn-hidden-size", "model"), _f("--moe-router-topk", "model"),
    _f("--moe-router-score-function", "model", choices=["softmax", "sigmoid"]),
    _f("--moe-router-pre-softmax", "model"),
    _f("--moe-router-topk-scaling-factor", "model"),
    _f("--moe-router-num-groups", "model"), _f("--moe-router-group-topk", "model"),
    _f("--moe-router-load-balancing-type", "model",
       choices=["aux_loss", "seq_aux_loss", "none"]),
    _f("--moe-aux-loss-coeff", "model"), _f("--moe-z-loss-coeff", "model"),
    _f("--moe-router-enable-expert-bias", "model"),
    _f("--moe-router-bias-update-rate", "model"),
    _f("--moe-token-dispatcher-type", "model", choices=["allgather", "alltoall"]),
    _f("--moe-expert-capacity-factor", "model"),
    _f("--moe-pad-expert-input-to-capacity", "model"),
    _f("--moe-token-drop-policy", "model", choices=["probs", "position"]),
    _f("--moe-shared-expert-intermediate-size", "model"),
    _f("--moe-shared-expert-gate", "model"),
    _f("--moe-layer-freq", "model", "moe_layer_freq_text", derived=True, type=str,
       help="Which layers are MoE: N (every N-th layer) or a 0/1 pattern with one entry "
            "per layer, e.g. 1,0,1,0 or [1,0,1,0] (default: 1, every layer)."),
    _f("--moe-grouped-gemm", "model"), _f("--moe-per-layer-logging", "model"),
    # GPTModel
    _f("--seq-length", "gpt"), _f("--max-position-embeddings", "gpt"),
    _f("--position-embedding-type", "gpt", choices=["learned_absolute", "rope", "none"]),
    _f("--rotary-percent", "gpt"), _f("--rotary-base", "gpt"),
    _f("--rotary-interleaved", "model"),
    _f("--use-rope-scaling", "gpt"), _f("--rope-scaling-factor", "gpt"),
    _f("--rope-scaling-low-freq-factor", "gpt"), _f("--rope-scaling-high-freq-factor", "gpt"),
    _f("--rope-scaling-original-max-position-embeddings", "gpt"),
    _f("--untie-embeddings-and-output-weights", "gpt"),
    _f("--make-vocab-size-divisible-by", "gpt"),
    # optimizer
    _f("--optimizer", "optimizer", choices=["adam", "adamw", "sgd"]),
    _f("--lr", "optimizer"), _f("--min-lr", "optimizer"), _f("--weight-decay", "optimizer"),
    _f("--adam-beta1", "optimizer"), _f("--adam-beta2", "optimizer"),
    _f("--adam-eps", "optimizer"), _f("--sgd-momentum", "optimizer"),
    _f("--clip-grad", "optimizer"), _f("--loss-scale", "optimizer"),
    _f("--initial-loss-scale", "optimizer"), _f("--min-loss-scale", "optimizer"),
    _f("--loss-scale-window", "optimizer"), _f("--hysteresis", "optimizer"),
    _f("--use-distributed-optimizer", "optimizer"),
    _f("--decoupled-lr", "optimizer"), _f("--decoupled-min-lr", "optimizer"),
    _f("--log-num-zeros-in-grad", "optimizer"),
    # DDP
    _f("--overlap-grad-reduce", "ddp"), _f("--overlap-param-gather", "ddp"),
    _f("--ddp-bucket-size", "ddp", "bucket_size"),
    _f("--accumulate-allreduce-grads-in-fp32", "ddp", "grad_reduce_in_fp32"),
    _f("--check-for-nan-in-loss-and-grad", "ddp", "check_for_nan_in_grad"),
    _f("--no-check-for-nan-in-loss-and-grad", "ddp", "check_for_nan_in_grad", invert=True),
    _f("--grad-reduce-in-bf16", "ddp", "grad_reduce_in_bf16", derived=True, type=bool,
       kind=MAPPED, setting="grad_reduce_in_fp32=False; with --bf16 grads are otherwise "
                            "accumulated and reduced in fp32 (Megatron's default)"),
    _f("--use-torch-fsdp2", "ddp"), _f("--fsdp-reshard-after-forward", "ddp"),
    # data and tokenizer
    _f("--data-path", "data", nargs="*"), _f("--split", "data"),
    _f("--train-data-path", "data", nargs="*"), _f("--valid-data-path", "data", nargs="*"),
    _f("--test-data-path", "data", nargs="*"), _f("--data-cache-path", "data"),
    _f("--mock-data", "data"),
    _f("--tokenizer-type", "data", choices=["GPT2BPETokenizer", "BertWordPieceLowerCase",
                                            "BertWordPieceCase", "SentencePieceTokenizer",
                                            "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                                            "TikTokenizer", "HuggingFaceTokenizer",
                                            "NullTokenizer"]),
    _f("--tiktoken-pattern", "data", choices=["v1", "v2"]),
    _f("--vocab-file", "data"), _f("--merge-file", "data"), _f("--tokenizer-model", "data"),
    _f("--vocab-size", "data"), _f("--reset-position-ids", "data"),
    _f("--reset-attention-mask", "data"), _f("--eod-mask-loss", "data"),
    _f("--num-workers", "data"),
    _f("--no-mmap-bin-files", "data", "mmap_bin_files", invert=True),
    _f("--no-create-attention-mask-in-dataloader", "compat", kind=MAPPED,
       setting="megacore's default: the data loader builds masks only for "
               "--reset-attention-mask; causal attention needs none"),
    # batch, duration, evaluation, seeds, exit
    _f("--micro-batch-size", "training"), _f("--global-batch-size", "training"),
    _f("--rampup-batch-size", "training", nargs="*"),
    _f("--step-batch-size-schedule", "training", nargs="+"),
    _f("--train-iters", "training"), _f("--train-samples", "training"),
    _f("--eval-interval", "training"), _f("--eval-iters", "training"),
    _f("--skip-train", "training"), _f("--seed", "training"),
    _f("--exit-interval", "training"), _f("--exit-duration-in-mins", "training"),
    _f("--exit-signal-handler", "training"),
    _f("--distributed-backend", "training", choices=["gloo", "nccl"]),
    _f("--distributed-timeout-minutes", "training"),
    _f("--manual-gc", "training"), _f("--manual-gc-interval", "training"),
    _f("--empty-unused-memory-level", "training"),
    # learning-rate schedule
    _f("--lr-decay-style", "scheduler",
       choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"]),
    _f("--lr-decay-iters", "scheduler"), _f("--lr-decay-samples", "scheduler"),
    _f("--lr-warmup-iters", "scheduler"), _f("--lr-warmup-samples", "scheduler"),
    _f("--lr-warmup-fraction", "scheduler"), _f("--lr-warmup-init", "scheduler"),
    _f("--lr-wsd-decay-style", "scheduler",
       choices=["exponential", "linear", "cosine", "minus_sqrt"]),
    _f("--lr-wsd-decay-iters", "scheduler"), _f("--lr-wsd-decay-samples", "scheduler"),
    _f("--start-weight-decay", "scheduler"), _f("--end-weight-decay", "scheduler"),
    _f("--weight-decay-incr-style", "scheduler", choices=["constant", "linear", "cosine"]),
    _f("--use-checkpoint-opt_param-scheduler", "scheduler", "use_checkpoint_opt_param_scheduler"),
    _f("--override-opt_param-scheduler", "scheduler", "override_opt_param_scheduler"),
    # logging
    _f("--log-interval", "logging"), _f("--log-jsonl", "logging"),
    _f("--tensorboard-dir", "logging"), _f("--wandb-project", "logging"),
    _f("--wandb-exp-name", "logging"), _f("--log-params-norm", "logging"),
    _f("--log-throughput", "compat", kind=MAPPED,
       setting="always on: every log line and metrics record has the throughput per "
               "device (TFLOP/s) and tokens/s"),
    _f("--profile", "logging"),
    _f("--profile-step-start", "logging"), _f("--profile-step-end", "logging"),
    _f("--profile-ranks", "logging", nargs="+"),
    _f("--use-pytorch-profiler", "compat", kind=MAPPED,
       setting="--profile, which always records with torch.profiler"),
    # checkpointing
    _f("--save", "checkpoint"), _f("--load", "checkpoint"), _f("--save-interval", "checkpoint"),
    _f("--no-load-optim", "checkpoint"), _f("--no-load-rng", "checkpoint"),
    _f("--finetune", "checkpoint"), _f("--exit-on-missing-checkpoint", "checkpoint"),
    _f("--use-checkpoint-args", "checkpoint"),
    _f("--ckpt-format", "checkpoint", choices=["torch", "torch_dist"]),
    _f("--async-save", "checkpoint"),
    _f("--ckpt-convert-format", "checkpoint", choices=["torch", "torch_dist"]),
    _f("--ckpt-convert-save", "checkpoint"),
    # Megatron-LM switches with no counterpart here (reported once at start-up), and the
    # fp8 flags, which need Transformer Engine's fp8 layers (the run stops).
    _f("--use-mcore-models", "compat", kind=NO_EFFECT,
       setting="megacore builds Megatron-Core-style models only"),
    _f("--cross-entropy-loss-fusion", "compat", kind=NO_EFFECT,
       setting="fused cross-entropy kernel; the vocab-parallel cross entropy computes the "
               "same loss"),
    _f("--cross-entropy-fusion-impl", "compat", choices=["native", "te"], kind=NO_EFFECT,
       setting="see --cross-entropy-loss-fusion"),
    _f("--no-position-embedding", "compat", kind=NO_EFFECT,
       setting="legacy switch; --position-embedding-type decides, as in Megatron-Core"),
    _f("--fp8-format", "compat", choices=["e4m3", "hybrid"], kind=NEEDS,
       setting=_FP8_NEEDS),
    _f("--fp8-amax-history-len", "compat", kind=NEEDS, setting=_FP8_NEEDS),
    _f("--fp8-amax-compute-algo", "compat", choices=["most_recent", "max"], kind=NEEDS,
       setting=_FP8_NEEDS),
    _f("--fp8-param-gather", "compat", kind=NEEDS, setting=_FP8_NEEDS),
]

DEPRECATED_FLAGS: List[DeprecatedFlag] = []
"""Renamed or removed flags that keep working, with a warning, until their ``removed_in``
(at least two minor versions: :class:`~megacore.deprecation.DeprecatedFlag`). They are
accepted on the command line and as ``--yaml-cfg`` keys, listed by ``--help``, and pinned
in the command-line snapshot like any flag. Add a row when renaming or removing a flag."""

DEPRECATED_FIELDS: List[DeprecatedFlag] = []
"""Renamed config fields, as ``DeprecatedFlag("section.old", "section.new", ...)``: a run
configuration saved in a checkpoint under the old name is read under the new one."""

_FLAG_OF_FIELD = {(f.section, f.field): f.flag for f in FLAGS}


@dataclasses.dataclass
class RunConfig:
    """Everything ``pretrain`` needs, as typed configs (the result of parsing flags)."""

    model: TransformerConfig
    gpt: GPTModelArgs
    optimizer: OptimizerConfig
    ddp: DistributedDataParallelConfig
    data: DataArgs
    training: TrainingArgs
    scheduler: SchedulerArgs
    logging: LoggingArgs
    checkpoint: CheckpointArgs
    compat: CompatArgs = dataclasses.field(default_factory=CompatArgs)
    yaml_cfg: Optional[str] = None

    @property
    def data_parallel_size(self) -> int:
        return self._dp

    _dp: int = 1
    num_microbatches: int = 1
    notes: List[str] = dataclasses.field(default_factory=list)
    """Lines ``pretrain`` prints once at start-up (settings taken from a checkpoint,
    flags with no effect on this backend)."""


# -- docstrings of dataclass fields, for --help ----------------------------------------
@functools.lru_cache(maxsize=None)
def _field_docs(cls) -> Dict[str, str]:
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _scalar_type(annotation) -> Optional[type]:
    """int/float/str/bool of a field annotation (Optional and List unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else None
    if origin in (list, List, tuple, typing.Tuple):
        return _scalar_type(typing.get_args(annotation)[0])
    return annotation if annotation in (int, float, str, bool) else None


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_info(flag: Flag):
    cls = SECTIONS[flag.section]
    hints = _type_hints(cls)
    if flag.derived:
        return flag.type, None
    if flag.field not in hints:
        raise KeyError(f"{flag.flag}: {cls.__name__} has no field {flag.field!r}")
    field = {f.name: f for f in dataclasses.fields(cls)}[flag.field]
    default = field.default if field.default is not dataclasses.MISSING else None
    return _scalar_type(hints[flag.field]), default


def _plain(text: str) -> str:
    """Help text for a terminal: no reST ``literal`` markup, ``%`` escaped for argparse."""
    return text.replace("``", "").replace("%", "%%")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage (the full list is ``--help``'s job) whose errors are
    printed by launch rank 0 only: under torchrun every rank parses the same flags, and
    the user should read one ``error:`` line, not one per rank."""

    def error(self, message: str):
        record_for_launcher(f"error: {message}")
        if is_launch_rank_zero():
            self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n" if is_launch_rank_zero() else None)


def build_parser(extra_args_provider=None, *, only: Optional[Sequence[str]] = None,
                 description: str = "megacore GPT pretraining (Megatron-style flags)"
                 ) -> argparse.ArgumentParser:
    """The argparse parser for every flag in ``FLAGS`` (plus ``--yaml-cfg``), or only for
    the flags named in ``only`` (a program that needs a few of them, like the server)."""
    parser = _ArgumentParser(description=description, allow_abbrev=False,
                             usage="%(prog)s [flags]   (--help lists them)")
    parser.add_argument("--yaml-cfg", default=None,
                        help="YAML file with the same settings; command-line flags win")
    docs = {name: _field_docs(cls) for name, cls in SECTIONS.items()}
    groups = {name: parser.add_argument_group(name) for name in SECTIONS}
    for flag in FLAGS:
        if only is not None and flag.flag not in only:
            continue
        kind, default = _field_info(flag)
        help_text = _plain(flag.help or docs[flag.section].get(flag.field, "")
                           or (f"Megatron-LM's flag, mapped: {flag.setting}" if flag.setting
                               else ""))
        if flag.invert:  # the docstring describes the field this switch turns off
            help_text = f"Turns off: {help_text}"
        if default is not None and not isinstance(default, bool):
            help_text += f" (default: {_plain(str(default))})"
        kwargs: Dict[str, Any] = dict(dest=_dest(flag), default=None, help=help_text)
        if kind is bool and flag.nargs is None:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=kind or str)
            if flag.choices:
                kwargs["choices"] = flag.choices
            if flag.nargs:
                kwargs["nargs"] = flag.nargs
        groups[flag.section].add_argument(flag.flag, **kwargs)
    _add_deprecated_flags(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def _add_deprecated_flags(parser: argparse.ArgumentParser) -> None:
    """Describe the deprecated aliases in ``--help`` (they are renamed before parsing)."""
    parser.deprecated_flags = {row.flag: {"replacement": row.replacement,
                                          "removed_in": row.removed_in}
                               for row in DEPRECATED_FLAGS}
    if DEPRECATED_FLAGS:
        parser.epilog = "deprecated flags (still accepted, with a warning): " + "; ".join(
            f"{row.flag} -> {row.replacement} (removed in {row.removed_in})"
            for row in DEPRECATED_FLAGS)


def _dest(flag: Flag) -> str:
    return flag.flag.lstrip("-").replace("-", "_")


def _load_yaml(path: str) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f) or {}
    except OSError as e:
        raise ArgumentValidationError(f"--yaml-cfg {path}: cannot read: {e}") from e
    except yaml.YAMLError as e:
        raise ArgumentValidationError(f"--yaml-cfg {path}: invalid YAML: {e}") from e
    if not isinstance(content, dict):
        raise ArgumentValidationError(f"--yaml-cfg {path}: expected a mapping of settings")
    known = {_dest(f): f for f in FLAGS}
    renamed = {_dest(Flag(r.flag, "", "")): r for r in DEPRECATED_FLAGS}
    out = {}
    for key, value in content.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest in renamed:
            row = renamed[dest]
            warn_deprecated(f"--yaml-cfg key {key!r}", since=row.since,
                            removed_in=row.removed_in, alternative=row.replacement)
            dest = _dest(Flag(row.replacement, "", ""))
        if dest not in known:
            raise ArgumentValidationError(f"--yaml-cfg {path}: unknown setting {key!r}")
        out[dest] = value
    return out


def parse_args(argv: Optional[Sequence[str]] = None, *, world_size: Optional[int] = None,
               extra_args_provider=None, ignore_unknown_args: bool = False,
               checkpoint_config: Optional[Dict[str, Any]] = None,
               checkpoint_path: str = "the checkpoint",
               for_inference: bool = False) -> RunConfig:
    """Parse flags (and ``--yaml-cfg``) into a validated :class:`RunConfig`.

    Args:
        argv: the flags (default ``sys.argv[1:]``). Unknown flags are an error.
        world_size: number of ranks (default: from ``torch.distributed`` or 1), needed to
            derive the data-parallel size and check the layout.
        extra_args_provider: ``parser -> parser`` adding a program's own flags.
        checkpoint_config: the run configuration saved in a checkpoint (``--load``). Its
            model and tokenizer settings (:data:`CHECKPOINT_MODEL_FLAGS`) fill flags not
            given; a flag given with a different value is an error naming both values.
        checkpoint_path: where ``checkpoint_config`` came from, for messages.
        for_inference: skip the checks that only matter for training (lr, duration, data).
    """
    parser = build_parser(extra_args_provider)
    argv = rename_deprecated_flags(sys.argv[1:] if argv is None else argv, DEPRECATED_FLAGS)
    if ignore_unknown_args:
        ns, _ = parser.parse_known_args(argv)
    else:
        ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if v is not None and v is not False}
    if ns.yaml_cfg:
        values = {**_load_yaml(ns.yaml_cfg), **values}
    notes: List[str] = []
    if checkpoint_config:
        values = _merge_checkpoint_config(values, checkpoint_config, checkpoint_path, notes)
    run = _build_run_config(values)
    run.yaml_cfg = ns.yaml_cfg
    run.notes.extend(notes + _derive_notes(values))
    if world_size is None:
        world_size = (torch.distributed.get_world_size()
                      if torch.distributed.is_available() and torch.distributed.is_initialized()
                      else 1)
    validate_run_config(run, world_size, for_inference=for_inference)
    return run


# -- the model configuration a checkpoint carries ----------------------------------------
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
        out[_dest(flag)] = (not value) if flag.invert else value
    return out


def model_flags_from_config(config: Dict[str, Dict[str, Any]]) -> List[str]:
    """Command-line flags reproducing a saved configuration's model and tokenizer."""
    by_dest = {_dest(f): f for f in FLAGS}
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
        dest = _dest(flag)
        if dest not in values:
            merged[dest] = saved
            notes.append(f"{name} {_flag_text(saved)}: taken from the checkpoint {path}")
        elif _flag_text(values[dest]) != _flag_text(saved):
            notes.append(f"WARNING: {name} {_flag_text(values[dest])} differs from the "
                         f"checkpoint's {_flag_text(saved)} ({path}); using "
                         f"{_flag_text(values[dest])}")


def _flag_text(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _merge_checkpoint_config(values: Dict[str, Any], config: Dict[str, Any],
                             path: str, notes: Optional[List[str]] = None) -> Dict[str, Any]:
    merged = dict(values)
    by_dest = {_dest(f): f.flag for f in FLAGS}
    for dest, saved in _config_values(config).items():
        if dest not in values:
            if saved is not False:
                merged[dest] = saved
            continue
        given = values[dest]
        if dest == "moe_layer_freq":
            given = _parse_layer_freq(given)
        if dest == "window_size":
            given, saved = _parse_window(given), tuple(saved)
        if given != saved and values.get("use_checkpoint_args"):
            merged[dest] = saved
            if notes is not None:
                notes.append(f"WARNING: {by_dest[dest]} {given}: replaced by the value {saved} "
                             f"saved in {path} (--use-checkpoint-args)")
        elif given != saved:
            raise ArgumentValidationError(
                f"{by_dest[dest]} {given} does not match the value {saved} saved in {path}; "
                f"drop the flag (or add --use-checkpoint-args) to use the checkpoint's, or "
                "convert the checkpoint")
    by_flag = {f.flag: f for f in FLAGS}
    for name in _CHECKPOINT_DEFAULT_FLAGS:
        flag = by_flag[name]
        saved = config.get(flag.section, {}).get(flag.field)
        if saved is not None and _dest(flag) not in merged:
            merged[_dest(flag)] = saved
    for dtype in ("fp16", "bf16"):  # precision follows the checkpoint unless chosen here
        if config.get("model", {}).get(dtype) and not (values.get("fp16") or values.get("bf16")):
            merged[dtype] = True
    _merge_resume_flags(values, merged, config, path, notes if notes is not None else [])
    return merged


# -- from flags to configs --------------------------------------------------------------
def _section_kwargs(values: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    kwargs: Dict[str, Dict[str, Any]] = {name: {} for name in SECTIONS}
    for flag in FLAGS:
        dest = _dest(flag)
        if flag.derived or dest not in values:
            continue
        value = values[dest]
        if flag.invert:
            value = not value
        kwargs[flag.section][flag.field] = value
    return kwargs


def _derive_notes(values: Dict[str, Any]) -> List[str]:
    """Start-up lines for flags given that change nothing here, in one line."""
    no_effect = [f.flag for f in FLAGS if f.kind == NO_EFFECT and _dest(f) in values]
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
            raise ArgumentValidationError(
                "--recompute-activations means --recompute-granularity selective; it "
                f"contradicts --recompute-granularity {model['recompute_granularity']}")
        model["recompute_granularity"] = "selective"
    if values.get("use_flash_attn"):
        backend = model.get("attention_backend", AttnBackend.flash)
        if _backend_name(backend) != "flash":
            raise ArgumentValidationError(
                f"--use-flash-attn contradicts --attention-backend {_backend_name(backend)}")
        model["attention_backend"] = AttnBackend.flash
    if "tokenizer_type" not in data and data.get("vocab_file") and data.get("merge_file"):
        data["tokenizer_type"] = "GPT2BPETokenizer"  # Megatron's default for vocab + merges
    bf16 = bool(values.get("bf16"))
    if values.get("grad_reduce_in_bf16"):
        if not bf16:
            raise ArgumentValidationError("--grad-reduce-in-bf16 needs --bf16")
        if values.get("accumulate_allreduce_grads_in_fp32"):
            raise ArgumentValidationError("--grad-reduce-in-bf16 contradicts "
                                          "--accumulate-allreduce-grads-in-fp32")
    elif bf16:
        kw["ddp"]["grad_reduce_in_fp32"] = True  # Megatron's default for bf16


def _backend_name(backend: Any) -> str:
    return backend.name if isinstance(backend, AttnBackend) else str(backend)


def _derive(values: Dict[str, Any], kw: Dict[str, Dict[str, Any]]) -> None:
    """Flags that set several fields or need arithmetic."""
    _derive_megatron_aliases(values, kw)
    model = kw["model"]
    if values.get("swiglu"):
        model["gated_linear_unit"] = True
        model["activation_func"] = F.silu
    if values.get("openai_gelu"):
        if values.get("swiglu"):
            raise ArgumentValidationError("--openai-gelu and --swiglu are alternatives "
                                          "(tanh GeLU vs gated SiLU); give one")
        model["activation_func"] = openai_gelu
    if values.get("window_size") is not None:
        model["window_size"] = _parse_window(values["window_size"])
    fp16, bf16 = bool(values.get("fp16")), bool(values.get("bf16"))
    if fp16 and bf16:
        raise ArgumentValidationError("--fp16 and --bf16 are mutually exclusive")
    if bf16 and values.get("use_torch_fsdp2"):
        # FSDP2's mixed precision: fp32 master weights (the optimizer updates them
        # directly), bf16 compute and bf16 activations between pipeline stages.
        model.update(bf16=True, params_dtype=torch.float32, pipeline_dtype=torch.bfloat16)
    elif fp16 or bf16:
        dtype = torch.float16 if fp16 else torch.bfloat16
        for section in ("model", "optimizer"):
            kw[section].update(fp16=fp16, bf16=bf16, params_dtype=dtype)
    if values.get("use_distributed_optimizer"):
        kw["ddp"]["use_distributed_optimizer"] = True
    if values.get("check_for_nan_in_loss_and_grad") and \
            values.get("no_check_for_nan_in_loss_and_grad"):
        raise ArgumentValidationError("--check-for-nan-in-loss-and-grad and "
                                      "--no-check-for-nan-in-loss-and-grad contradict each other")
    if values.get("group_query_attention") and "num_query_groups" not in model:
        raise ArgumentValidationError("--group-query-attention needs --num-query-groups")
    per_stage = values.get("num_layers_per_virtual_pipeline_stage")
    if per_stage is not None:
        if "virtual_pipeline_model_parallel_size" in model:
            raise ArgumentValidationError(
                "--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank"
                " are alternatives; give one")
        pp = model.get("pipeline_model_parallel_size", 1)
        layers = model.get("num_layers", 0)
        if pp < 2:
            raise ArgumentValidationError(
                "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if per_stage < 1 or layers % (pp * per_stage):
            raise ArgumentValidationError(
                f"--num-layers {layers} must be divisible by --pipeline-model-parallel-size {pp} "
                f"x --num-layers-per-virtual-pipeline-stage {per_stage}")
        model["virtual_pipeline_model_parallel_size"] = layers // (pp * per_stage)
    if values.get("attention_backend") is not None:
        model["attention_backend"] = AttnBackend[values["attention_backend"]]
    freq = values.get("moe_layer_freq")  # the flag's argparse destination
    if freq is not None:
        model["moe_layer_freq"] = _parse_layer_freq(freq)
    if model.get("virtual_pipeline_model_parallel_size") == 1:
        model["virtual_pipeline_model_parallel_size"] = None


def _parse_window(value) -> tuple:
    """``--window-size``: ``LEFT RIGHT`` or Megatron's ``LEFT,RIGHT`` -> ``(left, right)``."""
    items = value if isinstance(value, (list, tuple)) else [value]
    parts = [p for item in items for p in str(item).strip("()[] ").split(",") if p.strip()]
    try:
        window = tuple(int(p) for p in parts)
    except ValueError:
        window = ()
    if len(window) != 2:
        raise ArgumentValidationError(f"--window-size {value!r}: expected two integers "
                                      "LEFT RIGHT (or LEFT,RIGHT), e.g. 4095 0")
    return window


def _parse_layer_freq(text) -> Any:
    """``--moe-layer-freq``: ``2`` (every 2nd layer) or a 0/1 pattern ``1,0,1,0`` /
    ``[1,0,1,0]`` (one entry per layer)."""
    if isinstance(text, (int, list)):
        return text
    cleaned = str(text).strip().strip("[]")
    try:
        values = [int(v) for v in cleaned.split(",") if v.strip()]
    except ValueError:
        raise ArgumentValidationError(f"--moe-layer-freq {text!r}: expected an integer or a "
                                      "comma-separated 0/1 pattern such as 1,0,1,0") from None
    if len(values) == 1 and "," not in cleaned:
        return values[0]
    return values


def _build_section(name: str, kwargs: Dict[str, Any]):
    cls = SECTIONS[name]
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        flags = [flag for (section, field), flag in _FLAG_OF_FIELD.items()
                 if section == name and re.search(rf"\b{field}\b", str(e))]
        hint = f" [flags: {', '.join(sorted(set(flags)))}]" if flags else ""
        raise ArgumentValidationError(f"invalid {name} settings: {e}{hint}") from e


def _build_run_config(values: Dict[str, Any]) -> RunConfig:
    kw = _section_kwargs(values)
    _derive(values, kw)
    for key in ("rampup_batch_size",):
        if key in kw["training"]:
            kw["training"][key] = [int(v) for v in kw["training"][key]]
    schedule = kw["training"].get("step_batch_size_schedule")
    if isinstance(schedule, (list, tuple)):  # one quoted word, or (bash arrays) several
        kw["training"]["step_batch_size_schedule"] = " ".join(schedule)
    built = {name: _build_section(name, kw[name]) for name in SECTIONS}
    return RunConfig(**built)


# -- checks across configs (one place) ---------------------------------------------------
def validate_run_config(run: RunConfig, world_size: int, *, for_inference: bool = False) -> None:
    """Reject inconsistent combinations, naming the flags; derive dp and micro-batches.

    ``for_inference`` skips the checks of training-only settings (lr, duration, data).
    """
    for check in _CHECKS:
        if for_inference and check in _TRAINING_ONLY_CHECKS:
            continue
        check(run, world_size)


def _fail(message: str):
    raise ArgumentValidationError(message)


def _check_layout(run: RunConfig, world_size: int) -> None:
    m = run.model
    try:
        layout = ParallelLayout(world_size, m.tensor_model_parallel_size,
                                m.pipeline_model_parallel_size,
                                m.virtual_pipeline_model_parallel_size,
                                m.context_parallel_size, m.expert_model_parallel_size,
                                m.expert_tensor_parallel_size)
    except ValueError as e:
        raise ArgumentValidationError(str(e)) from e
    run._dp = layout.data_parallel_size


def _check_model_shape(run: RunConfig, world_size: int) -> None:
    m, g = run.model, run.gpt
    if m.num_layers < 1 or m.hidden_size < 1 or m.num_attention_heads < 1:
        _fail("--num-layers, --hidden-size and --num-attention-heads are required and must "
              "be positive")
    if g.position_embedding_type == "learned_absolute" and g.seq_length > g.max_position_embeddings:
        _fail(f"--seq-length {g.seq_length} exceeds --max-position-embeddings "
              f"{g.max_position_embeddings} with learned absolute positions")
    tp, cp = m.tensor_model_parallel_size, m.context_parallel_size
    if m.sequence_parallel and g.seq_length % tp:
        _fail(f"--sequence-parallel needs --seq-length ({g.seq_length}) divisible by "
              f"--tensor-model-parallel-size ({tp})")
    if cp > 1 and g.seq_length % (2 * cp):
        _fail(f"--context-parallel-size {cp} needs --seq-length ({g.seq_length}) divisible by "
              f"2 x {cp}")


def _check_rope_type(run: RunConfig, world_size: int) -> None:
    """YaRN replaces the other RoPE position scalings (they would compound)."""
    m, g = run.model, run.gpt
    if m.rope_type != "yarn":
        return
    if g.position_embedding_type != "rope":
        _fail(f"--rope-type yarn needs --position-embedding-type rope, got "
              f"{g.position_embedding_type}")
    if g.use_rope_scaling:
        _fail("--rope-type yarn and --use-rope-scaling are alternatives: give one")
    if g.rotary_percent != 1.0:
        _fail(f"--rope-type yarn rotates the whole --qk-pos-emb-head-dim: drop "
              f"--rotary-percent {g.rotary_percent}")


def _check_pipeline(run: RunConfig, world_size: int) -> None:
    m = run.model
    pp = m.pipeline_model_parallel_size
    first, last = m.num_layers_in_first_pipeline_stage, m.num_layers_in_last_pipeline_stage
    if pp == 1 and (first is not None or last is not None):
        _fail("--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers need "
              "--pipeline-model-parallel-size > 1")
    from megacore.pipeline_parallel.layer_split import pipeline_layer_counts
    from megacore.pipeline_parallel.schedule_plan import validate_pipeline_schedule

    if pp == 1 and m.pipeline_schedule is not None:
        _fail(f"--pipeline-schedule {m.pipeline_schedule} needs "
              "--pipeline-model-parallel-size > 1")
    try:
        pipeline_layer_counts(m.num_layers, pp, m.virtual_pipeline_model_parallel_size,
                              first, last)
        validate_pipeline_schedule(m.pipeline_schedule, pp,
                                   m.virtual_pipeline_model_parallel_size)
    except ValueError as e:
        raise ArgumentValidationError(str(e)) from e


def _check_batch(run: RunConfig, world_size: int) -> None:
    t = run.training
    dp, mbs = run._dp, t.micro_batch_size
    if t.step_batch_size_schedule is not None:
        _check_step_batch_size_schedule(run, mbs * dp)
    if t.global_batch_size is None:
        t.global_batch_size = mbs * dp
    if t.global_batch_size % (mbs * dp):
        _fail(f"--global-batch-size {t.global_batch_size} must be divisible by "
              f"--micro-batch-size {mbs} x data-parallel size {dp}")
    run.num_microbatches = t.global_batch_size // (mbs * dp)
    vpp = run.model.virtual_pipeline_model_parallel_size
    pp = run.model.pipeline_model_parallel_size
    if vpp is not None and run.num_microbatches % pp:
        _fail(f"the interleaved schedule needs the number of micro-batches "
              f"(--global-batch-size / (--micro-batch-size x dp) = {run.num_microbatches}) to "
              f"be divisible by --pipeline-model-parallel-size {pp}")
    if t.rampup_batch_size is not None:
        start, incr, _ = t.rampup_batch_size
        if start < 1 or incr < 1 or start % (mbs * dp) or incr % (mbs * dp):
            _fail("--rampup-batch-size start and increment must be positive multiples of "
                  f"--micro-batch-size x dp ({mbs * dp})")


def parse_step_batch_size_schedule(text: str, seq_length: int) -> List[List[int]]:
    """``"0:16 2.4B:320"`` -> ``[[0, 16], [samples, 320]]``: thresholds in tokens (suffixes
    K, M, B, T) converted to consumed samples, as Megatron-LM does."""
    units = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "T": 10 ** 12}

    def number(part: str) -> int:
        part = part.strip().upper()
        scale = units.get(part[-1:], 1)
        return int(float(part[:-1] if scale > 1 else part) * scale)

    steps = []
    for entry in text.replace(",", " ").split():
        threshold, sep, batch = entry.partition(":")
        try:
            steps.append([number(threshold) // seq_length, number(batch)])
        except ValueError:
            sep = ""
        if not sep:
            raise ArgumentValidationError(
                f"--step-batch-size-schedule: entry {entry!r} is not THRESHOLD:BATCH_SIZE "
                "(e.g. 0:16 2.4B:320)")
    return sorted(steps)


def _check_step_batch_size_schedule(run: RunConfig, quantum: int) -> None:
    t = run.training
    steps = parse_step_batch_size_schedule(t.step_batch_size_schedule, run.gpt.seq_length)
    if t.rampup_batch_size is not None:
        _fail("--step-batch-size-schedule and --rampup-batch-size are alternatives; give one")
    if not steps or steps[0][0] != 0:
        _fail("--step-batch-size-schedule must start at threshold 0")
    bad = [b for _, b in steps if b < 1 or b % quantum]
    if bad:
        _fail(f"--step-batch-size-schedule batch size {bad[0]} is not a positive multiple of "
              f"--micro-batch-size x data-parallel size ({quantum})")
    final = steps[-1][1]
    # Megatron-LM rejects --global-batch-size with a schedule even when they agree (its own
    # GPT-3 example passes both); agreeing values are accepted here.
    if t.global_batch_size is not None and t.global_batch_size != final:
        _fail(f"--global-batch-size {t.global_batch_size} differs from the last batch size "
              f"{final} of --step-batch-size-schedule; drop one or make them agree")
    t.global_batch_size = final


def _check_duration(run: RunConfig, world_size: int) -> None:
    t, s = run.training, run.scheduler
    if (t.train_iters is None) == (t.train_samples is None) and not t.skip_train:
        _fail("give exactly one of --train-iters and --train-samples")
    if t.train_iters is not None and t.train_iters < 0:
        _fail(f"--train-iters must be >= 0, got {t.train_iters}")
    if t.train_samples is not None and t.rampup_batch_size is None and t.train_iters is None:
        pass
    if t.train_iters is not None and (s.lr_decay_samples or s.lr_warmup_samples):
        _fail("--lr-decay-samples / --lr-warmup-samples go with --train-samples, not "
              "--train-iters")
    if s.lr_warmup_fraction is not None and s.lr_warmup_iters:
        _fail("--lr-warmup-fraction and --lr-warmup-iters are alternatives; give one")
    decay = s.lr_decay_iters if s.lr_decay_iters is not None else t.train_iters
    if decay is not None and s.lr_warmup_iters > max(decay, 0) and s.lr_decay_style != "constant":
        _fail(f"--lr-warmup-iters {s.lr_warmup_iters} exceeds the decay length {decay} "
              "(--lr-decay-iters or --train-iters)")
    if s.lr_decay_style == "WSD" and s.lr_wsd_decay_iters is None \
            and s.lr_wsd_decay_samples is None:
        _fail("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples)")
    if t.train_iters is not None and s.lr_wsd_decay_samples is not None:
        _fail("--lr-wsd-decay-samples goes with --train-samples, not --train-iters")
    if t.train_samples is not None and s.lr_wsd_decay_iters is not None:
        _fail("--lr-wsd-decay-iters goes with --train-iters; with --train-samples use "
              "--lr-wsd-decay-samples")
    if t.rampup_batch_size is not None and t.train_samples is None:
        _fail("--rampup-batch-size needs --train-samples (the number of steps is not fixed)")


def _check_optimizer(run: RunConfig, world_size: int) -> None:
    o = run.optimizer
    if o.lr is None:
        _fail("--lr is required")
    if o.min_lr is not None and o.min_lr > o.lr:
        _fail(f"--min-lr {o.min_lr} is larger than --lr {o.lr}")
    if o.loss_scale is not None and not o.fp16:
        _fail("--loss-scale applies to --fp16 training only")


def _check_recompute(run: RunConfig, world_size: int) -> None:
    m = run.model
    if m.recompute_num_layers is not None:
        per_stage = m.num_layers // m.pipeline_model_parallel_size
        if m.recompute_method == "block" and m.recompute_num_layers > per_stage:
            _fail(f"--recompute-num-layers {m.recompute_num_layers} exceeds the "
                  f"{per_stage} layers of a pipeline stage")


def _check_data(run: RunConfig, world_size: int) -> None:
    d = run.data
    separate = any(p for p in (d.train_data_path, d.valid_data_path, d.test_data_path))
    if d.mock_data and (d.data_path or separate):
        _fail("--mock-data cannot be combined with --data-path / --train-data-path")
    if d.data_path and separate:
        _fail("--data-path (with --split) and --train/valid/test-data-path are alternatives")
    if not (d.mock_data or d.data_path or separate) and not run.training.skip_train:
        _fail("no training data: give --data-path, --train-data-path or --mock-data")
    if d.data_path and len(d.data_path) > 1 and len(d.data_path) % 2:
        _fail("--data-path with several datasets must be weight/prefix pairs: "
              "w1 prefix1 w2 prefix2 ...")
    if d.tokenizer_type == "GPT2BPETokenizer" and not (d.vocab_file and d.merge_file):
        _fail("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    if d.tokenizer_type in ("BertWordPieceLowerCase", "BertWordPieceCase") and not d.vocab_file:
        _fail(f"--tokenizer-type {d.tokenizer_type} needs --vocab-file")
    if d.tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                            "Llama2Tokenizer", "TikTokenizer", "HuggingFaceTokenizer") \
            and not d.tokenizer_model:
        _fail(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")
    if d.tokenizer_type == "NullTokenizer" and not d.vocab_size:
        _fail("--tokenizer-type NullTokenizer needs --vocab-size")
    if d.tokenizer_type is None and not d.mock_data:
        _fail("--tokenizer-type is required with real data")
    if d.mock_data and d.tokenizer_type is None and not d.vocab_size:
        _fail("--mock-data needs a tokenizer or --vocab-size for the vocabulary")
    try:
        parse_and_normalize_split(d.split)
    except ValueError as e:
        _fail(str(e))


def _check_checkpointing(run: RunConfig, world_size: int) -> None:
    c, t = run.checkpoint, run.training
    if c.save_interval is not None and not c.save:
        _fail("--save-interval needs --save")
    if c.finetune and not c.load:
        _fail("--finetune needs --load")
    if t.exit_signal_handler and not c.save:
        _fail("--exit-signal-handler needs --save (it saves a checkpoint on SIGTERM)")
    if (c.ckpt_convert_format is None) != (c.ckpt_convert_save is None):
        _fail("--ckpt-convert-format and --ckpt-convert-save go together")
    if c.ckpt_convert_format is not None and not c.load:
        _fail("--ckpt-convert-format needs --load (the checkpoint to convert)")
    if c.async_save and not c.save:
        _fail("--async-save needs --save")


def _check_moe(run: RunConfig, world_size: int) -> None:
    m = run.model
    experts = getattr(m, "num_moe_experts", None)
    ep = m.expert_model_parallel_size
    if ep > 1 and not experts:
        _fail(f"--expert-model-parallel-size {ep} needs --num-experts")
    if experts and experts % ep:
        _fail(f"--num-experts {experts} must be divisible by --expert-model-parallel-size {ep}")


def _check_fsdp2(run: RunConfig, world_size: int) -> None:
    if not run.ddp.use_torch_fsdp2:
        return
    m, d, c = run.model, run.ddp, run.checkpoint
    conflicts = [
        (d.use_distributed_optimizer, "--use-distributed-optimizer (FSDP2 already shards the "
                                      "optimizer state)"),
        (d.overlap_grad_reduce or d.overlap_param_gather,
         "--overlap-grad-reduce / --overlap-param-gather (DDP options; FSDP2 overlaps itself)"),
        (m.fp16, "--fp16 (use --bf16: loss scaling over sharded grads is not implemented)"),
        (m.pipeline_schedule == "zb-h1", "--pipeline-schedule zb-h1 (its split backward "
                                         "bypasses FSDP2's backward hooks)"),
        (m.gradient_accumulation_fusion, "--gradient-accumulation-fusion (needs DDP's "
                                         "main_grad buffers)"),
        (getattr(m, "moe_grouped_gemm", False), "--moe-grouped-gemm (stacked experts cannot be "
                                                 "saved under FSDP2)"),
        (c.ckpt_format == "torch" and bool(c.save or c.load),
         "--ckpt-format torch (use torch_dist, which reshards FSDP2 checkpoints)"),
    ]
    for bad, what in conflicts:
        if bad:
            _fail(f"--use-torch-fsdp2 cannot be combined with {what}")


def _check_requirements(run: RunConfig, world_size: int) -> None:
    """A flag that needs something this run does not have stops here, before training."""
    for flag in FLAGS:
        if flag.kind != NEEDS:
            continue
        value = getattr(getattr(run, flag.section), flag.field)
        default = {f.name: f.default for f in dataclasses.fields(SECTIONS[flag.section])}
        if value != default[flag.field]:
            shown = "" if isinstance(value, bool) else f" {value}"
            _fail(f"{flag.flag}{shown} needs {flag.setting}")


def _check_transformer_impl(run: RunConfig, world_size: int) -> None:
    if run.model.transformer_impl != "transformer_engine":
        return
    from megacore.transformer.extensions import require_transformer_engine

    try:
        require_transformer_engine()
    except RuntimeError as e:
        raise ArgumentValidationError(str(e)) from e
    m = run.model
    if m.num_query_groups < m.tensor_model_parallel_size:
        _fail(f"--transformer-impl transformer_engine needs --num-query-groups "
              f"({m.num_query_groups}) >= --tensor-model-parallel-size "
              f"({m.tensor_model_parallel_size})")


_CHECKS = [_check_requirements, _check_transformer_impl, _check_layout, _check_model_shape,
           _check_rope_type, _check_pipeline, _check_batch,
           _check_duration, _check_optimizer, _check_recompute, _check_data,
           _check_checkpointing, _check_moe, _check_fsdp2]
_TRAINING_ONLY_CHECKS = (_check_duration, _check_optimizer, _check_data)


# -- printing and saving the resolved configuration -----------------------------------
def _jsonable(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if callable(value):
        return getattr(value, "__name__", repr(value))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and hasattr(value, "name"):  # enums
        return value.name
    return value


# Set by the training loop, not part of a run's identity.
_RUNTIME_HOOKS = {"timers", "finalize_model_grads_func", "grad_scale_func", "no_sync_func",
                  "grad_sync_func", "param_sync_func"}


def run_config_to_dict(run: RunConfig) -> Dict[str, Dict[str, Any]]:
    """The resolved configuration as plain JSON-able data (printed and checkpointed)."""
    out = {}
    for name in SECTIONS:
        config = getattr(run, name)
        out[name] = {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)
                     if f.name not in _RUNTIME_HOOKS}
    out["derived"] = {"data_parallel_size": run.data_parallel_size,
                      "num_microbatches": run.num_microbatches}
    return json.loads(json.dumps(out, default=str))
