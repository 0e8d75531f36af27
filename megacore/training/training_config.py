"""Run configuration of ``pretrain``: the settings that are not part of a model or optimizer.

The library configs (``TransformerConfig``, ``OptimizerConfig``,
``DistributedDataParallelConfig``) describe what is trained; these dataclasses describe
the run: model-level choices that live outside ``TransformerConfig`` (vocabulary,
positions, tied embeddings), data and tokenizer, batch and duration, learning-rate
schedule, evaluation, logging, checkpointing and exit conditions. Field names match
Megatron's argument names, so ``--some-flag`` sets ``some_flag``.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

from megacore.config_error import FieldError

__all__ = [
    "GPTModelArgs",
    "DataArgs",
    "TrainingArgs",
    "SchedulerArgs",
    "LoggingArgs",
    "CheckpointArgs",
    "CompatArgs",
]


@dataclasses.dataclass
class GPTModelArgs:
    """GPTModel constructor arguments that are not part of ``TransformerConfig``."""

    seq_length: int = 1024
    """Tokens per sample."""

    max_position_embeddings: Optional[int] = None
    """Size of the learned position table (None: seq_length)."""

    position_embedding_type: str = "learned_absolute"
    """``learned_absolute``, ``rope`` or ``none``."""

    rotary_percent: float = 1.0
    """Fraction of each head's channels rotated by RoPE."""

    rotary_base: int = 10000
    """RoPE base period."""

    use_rope_scaling: bool = False
    """Llama 3.1+ RoPE frequency scaling (low frequencies divided by
    --rope-scaling-factor, a smooth blend between the two wavelength thresholds)."""

    rope_scaling_factor: float = 8.0
    """Divisor of the low RoPE frequencies with --use-rope-scaling (Llama 3.1: 8)."""

    rope_scaling_low_freq_factor: float = 1.0
    """With --use-rope-scaling: wavelengths above original context / this are scaled
    fully (Llama 3.1: 1)."""

    rope_scaling_high_freq_factor: float = 4.0
    """With --use-rope-scaling: wavelengths below original context / this are kept
    (Llama 3.1: 4)."""

    rope_scaling_original_max_position_embeddings: int = 8192
    """With --use-rope-scaling: the context length the model was first trained on
    (Llama 3.1: 8192)."""

    untie_embeddings_and_output_weights: bool = False
    """Give the output layer its own weight instead of reusing the word embedding."""

    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times tp (fast kernels, even tp split)."""

    def __post_init__(self):
        if self.seq_length < 1:
            raise FieldError(f"seq_length must be >= 1, got {self.seq_length}", "seq_length")
        if self.position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise FieldError("position_embedding_type must be learned_absolute, rope or none, "
                             f"got {self.position_embedding_type!r}", "position_embedding_type")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise FieldError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}",
                             "rotary_percent")
        if self.use_rope_scaling and not (
                self.rope_scaling_factor > 0
                and self.rope_scaling_low_freq_factor < self.rope_scaling_high_freq_factor):
            raise FieldError("use_rope_scaling needs rope_scaling_factor > 0 and "
                             "rope_scaling_low_freq_factor < rope_scaling_high_freq_factor",
                             "use_rope_scaling", "rope_scaling_factor",
                             "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor")
        if self.make_vocab_size_divisible_by < 1:
            raise FieldError("make_vocab_size_divisible_by must be >= 1",
                             "make_vocab_size_divisible_by")
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length


@dataclasses.dataclass
class DataArgs:
    """Where the tokens come from and how they are cut into samples."""

    data_path: Optional[List[str]] = None
    """One prefix, or ``w1 prefix1 w2 prefix2 ...``, split into train/valid/test by --split."""

    split: str = "969,30,1"
    """Relative sizes of train, valid and test (of the sequences of --data-path)."""

    train_data_path: Optional[List[str]] = None
    """Separate training data (instead of --data-path with --split)."""

    valid_data_path: Optional[List[str]] = None
    """Separate validation data."""

    test_data_path: Optional[List[str]] = None
    """Separate test data."""

    data_cache_path: Optional[str] = None
    """Directory for the dataset index caches (default: next to the data)."""

    mock_data: bool = False
    """Train on synthetic tokens (no files needed)."""

    tokenizer_type: Optional[str] = None
    """GPT2BPETokenizer, BertWordPieceLowerCase, BertWordPieceCase, SentencePieceTokenizer,
    GPTSentencePieceTokenizer, Llama2Tokenizer, TikTokenizer, HuggingFaceTokenizer or
    NullTokenizer (default: GPT2BPETokenizer when --vocab-file and --merge-file are given,
    as in Megatron-LM)."""

    vocab_file: Optional[str] = None
    """vocab.json (GPT-2 BPE) or vocab.txt (WordPiece)."""

    merge_file: Optional[str] = None
    """merges.txt (GPT-2 BPE)."""

    tokenizer_model: Optional[str] = None
    """SentencePiece model or local Hugging Face tokenizer directory/file."""

    vocab_size: Optional[int] = None
    """Vocabulary size for NullTokenizer."""

    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token."""

    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens."""

    eod_mask_loss: bool = False
    """Give end-of-document tokens no loss."""

    num_workers: int = 0
    """DataLoader worker processes per rank."""

    mmap_bin_files: bool = True
    """Memory-map the ``.bin`` files (False: read each into memory; for file systems where
    mmap is slow or unavailable)."""

    tiktoken_pattern: Optional[str] = None
    """``v1`` or ``v2``: the pre-tokenization regex of a TikTokenizer vocabulary."""

    def __post_init__(self):
        if self.num_workers < 0:
            raise FieldError(f"num_workers must be >= 0, got {self.num_workers}", "num_workers")
        if self.tiktoken_pattern not in (None, "v1", "v2"):
            raise FieldError(f"tiktoken_pattern must be v1 or v2, got {self.tiktoken_pattern!r}",
                             "tiktoken_pattern")


@dataclasses.dataclass
class TrainingArgs:
    """Batch, duration, evaluation, seeds and exit conditions."""

    micro_batch_size: int = 1
    """Samples per forward pass on one rank."""

    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all data-parallel ranks (None: micro x dp);
    gradient accumulation = global / (micro x dp)."""

    rampup_batch_size: Optional[List[int]] = None
    """``start increment samples``: grow the global batch from start by increment over
    that many samples."""

    step_batch_size_schedule: Optional[str] = None
    """``"THRESHOLD:BATCH ..."``: the global batch size from each threshold of consumed
    tokens on (suffixes K, M, B, T; the first threshold is 0), e.g.
    ``"0:16 2.4B:320 4.8B:1536"``. Its last batch size is the global batch size."""

    train_iters: Optional[int] = None
    """Optimizer steps to train (or use --train-samples)."""

    train_samples: Optional[int] = None
    """Samples to train on (alternative to --train-iters)."""

    eval_interval: int = 1000
    """Evaluate on the validation set every this many steps."""

    eval_iters: int = 100
    """Global batches per evaluation (0: no evaluation)."""

    skip_train: bool = False
    """Only evaluate (with --load)."""

    seed: int = 1234
    """Seed for initialization, dropout and data order."""

    exit_interval: Optional[int] = None
    """Stop (after saving, when --save is set) at an iteration divisible by this."""

    exit_duration_in_mins: Optional[float] = None
    """Stop (after saving) once the run has lasted this long."""

    exit_signal_handler: bool = False
    """On SIGTERM, save a checkpoint and exit cleanly."""

    distributed_backend: Optional[str] = None
    """``gloo`` or ``nccl`` (default: nccl with GPUs, gloo without)."""

    distributed_timeout_minutes: float = 10
    """How long any collective or pipeline exchange may wait for a peer, in minutes, for
    every process group (the default one included) and the background checkpoint group:
    a stopped or dead peer ends every rank with an error naming the operation after about
    this long. Fractions are accepted (Megatron takes whole minutes)."""

    manual_gc: bool = False
    """Disable Python's automatic garbage collector for the run and collect at chosen
    points instead (all ranks pause together rather than at random steps)."""

    manual_gc_interval: int = 0
    """With --manual-gc, collect every this many steps (0: only at start and around
    evaluation)."""

    empty_unused_memory_level: int = 0
    """Release cached accelerator memory: 1 after each training step, 2 also after each
    evaluation (no effect on CPU, which has no caching allocator)."""

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise FieldError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}",
                             "micro_batch_size")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise FieldError(f"global_batch_size must be >= 1, got {self.global_batch_size}",
                             "global_batch_size")
        if self.rampup_batch_size is not None and len(self.rampup_batch_size) != 3:
            raise FieldError("rampup_batch_size needs three numbers: start increment samples",
                             "rampup_batch_size")
        if self.eval_interval < 1:
            raise FieldError(f"eval_interval must be >= 1, got {self.eval_interval}",
                             "eval_interval")
        if self.eval_iters < 0:
            raise FieldError(f"eval_iters must be >= 0, got {self.eval_iters}", "eval_iters")
        if self.manual_gc_interval < 0:
            raise FieldError(f"manual_gc_interval must be >= 0, got {self.manual_gc_interval}",
                             "manual_gc_interval")
        if self.empty_unused_memory_level not in (0, 1, 2):
            raise FieldError("empty_unused_memory_level must be 0, 1 or 2, got "
                             f"{self.empty_unused_memory_level}", "empty_unused_memory_level")


@dataclasses.dataclass
class SchedulerArgs:
    """Learning-rate and weight-decay schedule (see ``OptimizerParamScheduler``)."""

    lr_decay_style: str = "linear"
    """constant, linear, cosine, inverse-square-root or WSD."""

    lr_decay_iters: Optional[int] = None
    """Steps over which the lr decays (None: --train-iters)."""

    lr_decay_samples: Optional[int] = None
    """Samples over which the lr decays (with --train-samples)."""

    lr_warmup_iters: int = 0
    """Linear warm-up steps."""

    lr_warmup_samples: int = 0
    """Linear warm-up samples (with --train-samples)."""

    lr_warmup_fraction: Optional[float] = None
    """Warm-up as a fraction of the decay steps (instead of --lr-warmup-iters)."""

    lr_warmup_init: float = 0.0
    """Learning rate at the start of warm-up."""

    lr_wsd_decay_style: str = "exponential"
    """Decay shape of the WSD schedule's final phase."""

    lr_wsd_decay_iters: Optional[int] = None
    """Steps of the WSD schedule's final decay."""

    lr_wsd_decay_samples: Optional[int] = None
    """Samples of the WSD schedule's final decay (with --train-samples)."""

    start_weight_decay: Optional[float] = None
    """Weight decay at the start (None: --weight-decay)."""

    end_weight_decay: Optional[float] = None
    """Weight decay at the end (None: --weight-decay)."""

    weight_decay_incr_style: str = "constant"
    """constant, linear or cosine."""

    use_checkpoint_opt_param_scheduler: bool = False
    """Take the schedule from the checkpoint, ignoring these flags."""

    override_opt_param_scheduler: bool = False
    """Take the schedule from these flags, ignoring the checkpoint."""

    def __post_init__(self):
        if self.lr_warmup_fraction is not None and not 0.0 <= self.lr_warmup_fraction <= 1.0:
            raise FieldError(f"lr_warmup_fraction must be in [0, 1], got {self.lr_warmup_fraction}",
                             "lr_warmup_fraction")
        if self.lr_warmup_iters < 0:
            raise FieldError(f"lr_warmup_iters must be >= 0, got {self.lr_warmup_iters}",
                             "lr_warmup_iters")


@dataclasses.dataclass
class LoggingArgs:
    """What is reported and where."""

    log_interval: int = 100
    """Print a log line every this many steps."""

    log_jsonl: Optional[str] = None
    """Also append one JSON object per logged step to this file."""

    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here (needs the tensorboard package; without it a warning
    is printed and training goes on, as in Megatron-LM)."""

    wandb_project: Optional[str] = None
    """Log to this Weights & Biases project (needs the wandb package)."""

    wandb_exp_name: Optional[str] = None
    """W&B run name."""

    log_params_norm: bool = False
    """Also report the norm of all parameters."""

    profile: bool = False
    """Record a torch.profiler trace of steps --profile-step-start to --profile-step-end
    (written to --tensorboard-dir, else ./profile, one file per profiled rank)."""

    profile_step_start: int = 10
    """First profiled step."""

    profile_step_end: int = 12
    """Step at which profiling stops (not profiled)."""

    profile_ranks: List[int] = dataclasses.field(default_factory=lambda: [0])
    """Global ranks to profile."""

    def __post_init__(self):
        if self.log_interval < 1:
            raise FieldError(f"log_interval must be >= 1, got {self.log_interval}", "log_interval")
        if self.profile and not 0 <= self.profile_step_start < self.profile_step_end:
            raise FieldError("profile steps need 0 <= profile_step_start < profile_step_end, "
                             f"got {self.profile_step_start} and {self.profile_step_end}",
                             "profile", "profile_step_start", "profile_step_end")


@dataclasses.dataclass
class CheckpointArgs:
    """Saving, loading and converting checkpoints."""

    save: Optional[str] = None
    """Directory to save checkpoints to."""

    load: Optional[str] = None
    """Directory to load a checkpoint from (the latest iteration)."""

    save_interval: Optional[int] = None
    """Save every this many steps."""

    no_load_optim: bool = False
    """Do not load the optimizer state."""

    no_load_rng: bool = False
    """Do not load the random-generator states."""

    finetune: bool = False
    """Load only the model weights and start from iteration 0."""

    use_checkpoint_args: bool = False
    """Take the model and tokenizer settings from the --load checkpoint even where a flag
    given here says otherwise (each overridden flag is reported); without it such a
    disagreement is an error."""

    exit_on_missing_checkpoint: bool = False
    """With --load, stop with an error when the directory holds no checkpoint (default:
    train from scratch after a warning, so ``--save X --load X`` auto-resumes)."""

    ckpt_format: str = "torch_dist"
    """``torch`` (per-rank legacy files) or ``torch_dist`` (distributed, reshardable)."""

    async_save: bool = False
    """Write checkpoints in the background."""

    ckpt_convert_format: Optional[str] = None
    """Convert the loaded checkpoint to this format and exit."""

    ckpt_convert_save: Optional[str] = None
    """Where the converted checkpoint goes."""

    def __post_init__(self):
        if self.ckpt_format not in ("torch", "torch_dist"):
            raise FieldError(f"ckpt_format must be torch or torch_dist, got {self.ckpt_format!r}",
                             "ckpt_format")
        if self.save_interval is not None and self.save_interval < 1:
            raise FieldError(f"save_interval must be >= 1, got {self.save_interval}",
                             "save_interval")


@dataclasses.dataclass
class CompatArgs:
    """Megatron-LM flags with no counterpart in megacore's PyTorch layers: kernel, fusion
    and hardware choices, and switches for things megacore always or never does. They are
    accepted so that Megatron-LM launch scripts run unchanged, and ``pretrain`` lists the
    ones given in one line at start-up. The fp8 flags are different: they need Transformer
    Engine's fp8 layers, which megacore does not drive, so giving one stops the run before
    training (see ``docs/megatron_flags.md``)."""

    use_mcore_models: bool = False
    """Megatron-LM: build Megatron-Core models rather than the legacy ones. megacore has
    only Megatron-Core-style models, so this is always the case."""

    cross_entropy_loss_fusion: bool = False
    """Megatron-LM: a fused cross-entropy kernel. megacore's vocab-parallel cross entropy
    computes the same loss unfused."""

    cross_entropy_fusion_impl: Optional[str] = None
    """Megatron-LM: which fused cross-entropy kernel (``native`` or ``te``); see
    --cross-entropy-loss-fusion."""

    no_position_embedding: bool = False
    """Megatron-LM's legacy switch; Megatron-Core models (and megacore) follow
    --position-embedding-type and ignore it."""

    no_create_attention_mask_in_dataloader: bool = False
    """Megatron-LM: do not build a causal mask tensor per sample. megacore builds masks in
    the data loader only for --reset-attention-mask (causal attention needs none)."""

    log_throughput: bool = False
    """Megatron-LM: add the TFLOP/s per device to the log line. megacore always reports
    it (and tokens/s) in the log line and the JSONL/TensorBoard metrics."""

    use_pytorch_profiler: bool = False
    """Megatron-LM: profile with torch.profiler instead of an nsys capture range.
    megacore's --profile always uses torch.profiler."""

    fp8_format: Optional[str] = None
    """fp8 training (``e4m3`` or ``hybrid``): needs Transformer Engine's fp8 layers on a
    CUDA GPU, which megacore does not drive; the run stops naming the flag."""

    fp8_amax_history_len: Optional[int] = None
    """fp8 scaling history length (see --fp8-format)."""

    fp8_amax_compute_algo: Optional[str] = None
    """fp8 scaling algorithm, ``most_recent`` or ``max`` (see --fp8-format)."""

    fp8_param_gather: bool = False
    """Keep and all-gather parameters in fp8 (see --fp8-format)."""
