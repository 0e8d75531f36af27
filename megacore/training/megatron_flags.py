"""The Megatron-LM flag table: one :class:`Flag` row per command-line flag.

Each row names the Megatron flag, the run-config section and field it sets, and how
megacore treats it (:data:`FLAG_KINDS`). Everything else is generated from this table: the
parser (:mod:`~megacore.training.argument_parser`), the conversion of parsed values into
configs (:mod:`~megacore.training.flag_values`) and ``docs/megatron_flags.md``
(:mod:`~megacore.training.flag_table`). Add a flag by adding a row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence

from megacore.distributed import DistributedDataParallelConfig
from megacore.optimizer import OptimizerConfig
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

__all__ = ["Flag", "FLAGS", "SECTIONS", "FLAG_KINDS", "IMPLEMENTED", "MAPPED", "NO_EFFECT",
           "NEEDS", "flag_dest", "flags_of_fields"]

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


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag and the config field it sets.

    ``invert``: a store-true flag that sets a boolean field to False
    (``--disable-bias-linear`` -> ``add_bias_linear=False``). ``derived``: the flag is read
    by :mod:`~megacore.training.flag_values` instead of being copied into a field. ``kind``: one of
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
    _f("--pipeline-schedule", "model", choices=["1f1b", "interleaved-1f1b", "zb-h1", "zbv"]),
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


def flag_dest(flag: Flag) -> str:
    """The argparse destination (and ``--yaml-cfg`` key) of a flag: ``--lr-decay-style`` ->
    ``lr_decay_style``."""
    return flag.flag.lstrip("-").replace("-", "_")


def flags_of_fields(section: str, fields: Sequence[str]) -> List[str]:
    """The flags that set ``fields`` of ``section``, sorted: how an error raised by a
    config's ``__post_init__`` (:class:`~megacore.config_error.FieldError`) names
    flags. A field that several flags set is told by its last row in :data:`FLAGS`."""
    flag_of_field = {(f.section, f.field): f.flag for f in FLAGS}
    return sorted({flag_of_field[section, name] for name in fields
                   if (section, name) in flag_of_field})
