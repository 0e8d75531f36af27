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

__all__ = [
    "GPTModelArgs",
    "DataArgs",
    "TrainingArgs",
    "SchedulerArgs",
    "LoggingArgs",
    "CheckpointArgs",
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
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")
        if self.position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise ValueError("position_embedding_type must be learned_absolute, rope or none, "
                             f"got {self.position_embedding_type!r}")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        if self.use_rope_scaling and not (
                self.rope_scaling_factor > 0
                and self.rope_scaling_low_freq_factor < self.rope_scaling_high_freq_factor):
            raise ValueError("use_rope_scaling needs rope_scaling_factor > 0 and "
                             "rope_scaling_low_freq_factor < rope_scaling_high_freq_factor")
        if self.make_vocab_size_divisible_by < 1:
            raise ValueError("make_vocab_size_divisible_by must be >= 1")
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
    HuggingFaceTokenizer or NullTokenizer."""

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

    def __post_init__(self):
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


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

    distributed_timeout_minutes: int = 10
    """Timeout of collectives."""

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.rampup_batch_size is not None and len(self.rampup_batch_size) != 3:
            raise ValueError("rampup_batch_size needs three numbers: start increment samples")
        if self.eval_interval < 1:
            raise ValueError(f"eval_interval must be >= 1, got {self.eval_interval}")
        if self.eval_iters < 0:
            raise ValueError(f"eval_iters must be >= 0, got {self.eval_iters}")


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
            raise ValueError(f"lr_warmup_fraction must be in [0, 1], got {self.lr_warmup_fraction}")
        if self.lr_warmup_iters < 0:
            raise ValueError(f"lr_warmup_iters must be >= 0, got {self.lr_warmup_iters}")


@dataclasses.dataclass
class LoggingArgs:
    """What is reported and where."""

    log_interval: int = 100
    """Print a log line every this many steps."""

    log_jsonl: Optional[str] = None
    """Also append one JSON object per logged step to this file."""

    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here (needs the tensorboard package)."""

    wandb_project: Optional[str] = None
    """Log to this Weights & Biases project (needs the wandb package)."""

    wandb_exp_name: Optional[str] = None
    """W&B run name."""

    log_params_norm: bool = False
    """Also report the norm of all parameters."""

    def __post_init__(self):
        if self.log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {self.log_interval}")


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
            raise ValueError(f"ckpt_format must be torch or torch_dist, got {self.ckpt_format!r}")
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {self.save_interval}")
