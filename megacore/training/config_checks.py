"""Checks across configs, and the sizes derived from them, each in one place.

:func:`derive_sizes` computes what follows from several configs at once (the
data-parallel size from the layout, the global batch size and the micro-batches per step)
and returns it; nothing else computes them. Each ``_check_*`` function is pure: it reads
the configs and those sizes and raises :class:`~megacore.training.flag_error.FlagError`
naming the flags, or returns; none writes, so they can run in any order, any number of
times. :func:`validate_run_config` runs them all and then, in one step, records the sizes
on the :class:`RunConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import List

from megacore.datasets.split_and_blend import parse_and_normalize_split
from megacore.parallel_state import ParallelLayout
from megacore.training.flag_error import FlagError
from megacore.training.megatron_flags import FLAGS, NEEDS, SECTIONS
from megacore.training.run_config import RunConfig

__all__ = ["DerivedSizes", "derive_sizes", "validate_run_config", "apply_sizes", "CHECKS",
           "TRAINING_ONLY_CHECKS", "parse_step_batch_size_schedule"]

_LAYOUT_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--num-virtual-stages-per-pipeline-rank", "--context-parallel-size",
                 "--expert-model-parallel-size", "--expert-tensor-parallel-size")
_PIPELINE_FLAGS = ("--num-layers", "--pipeline-model-parallel-size",
                   "--num-virtual-stages-per-pipeline-rank", "--decoder-first-pipeline-num-layers",
                   "--decoder-last-pipeline-num-layers", "--pipeline-schedule")


@dataclasses.dataclass(frozen=True)
class DerivedSizes:
    """The sizes that follow from several configs and the world size together."""

    data_parallel_size: int
    """World size / (tp x cp x pp): ranks holding the same model shard."""
    global_batch_size: int
    """--global-batch-size, else the last size of --step-batch-size-schedule, else
    --micro-batch-size x dp."""
    num_microbatches: int
    """Micro-batches per step: global batch / (micro-batch x dp), rounded down (a
    remainder is an error, raised by the batch check)."""


def derive_sizes(run: RunConfig, world_size: int) -> DerivedSizes:
    """The data-parallel size and batch sizes of ``run`` on ``world_size`` ranks.

    Raises:
        FlagError: the layout does not divide the world size, or the step batch-size
            schedule cannot be read.
    """
    m, t = run.model, run.training
    try:
        layout = ParallelLayout(world_size, m.tensor_model_parallel_size,
                                m.pipeline_model_parallel_size,
                                m.virtual_pipeline_model_parallel_size,
                                m.context_parallel_size, m.expert_model_parallel_size,
                                m.expert_tensor_parallel_size)
    except ValueError as e:
        raise FlagError(str(e), *_LAYOUT_FLAGS) from e
    dp = layout.data_parallel_size
    gbs = t.global_batch_size
    if gbs is None and t.step_batch_size_schedule is not None:
        steps = parse_step_batch_size_schedule(t.step_batch_size_schedule, run.gpt.seq_length)
        gbs = steps[-1][1] if steps else None
    if gbs is None:
        gbs = t.micro_batch_size * dp
    return DerivedSizes(dp, gbs, gbs // (t.micro_batch_size * dp))


def validate_run_config(run: RunConfig, world_size: int, *, for_inference: bool = False) -> None:
    """Reject inconsistent combinations, naming the flags; derive dp and micro-batches.

    The checks only read; the derived sizes (:func:`derive_sizes`) are written to ``run``
    once, after every check passed. ``for_inference`` skips the checks of training-only
    settings (lr, duration, data).
    """
    sizes = derive_sizes(run, world_size)
    for check in CHECKS:
        if not (for_inference and check in TRAINING_ONLY_CHECKS):
            check(run, sizes)
    apply_sizes(run, sizes)


def apply_sizes(run: RunConfig, sizes: DerivedSizes) -> None:
    """Record ``sizes`` on ``run``: the one place a validated run is written to."""
    run.training.global_batch_size = sizes.global_batch_size
    run._dp = sizes.data_parallel_size
    run.num_microbatches = sizes.num_microbatches


def _fail(message: str, *flags: str):
    raise FlagError(message, *flags)


def _check_model_shape(run: RunConfig, sizes: DerivedSizes) -> None:
    m, g = run.model, run.gpt
    if m.num_layers < 1 or m.hidden_size < 1 or m.num_attention_heads < 1:
        _fail("--num-layers, --hidden-size and --num-attention-heads are required and must "
              "be positive", "--num-layers", "--hidden-size", "--num-attention-heads")
    if g.position_embedding_type == "learned_absolute" and g.seq_length > g.max_position_embeddings:
        _fail(f"--seq-length {g.seq_length} exceeds --max-position-embeddings "
              f"{g.max_position_embeddings} with learned absolute positions",
              "--seq-length", "--max-position-embeddings")
    tp, cp = m.tensor_model_parallel_size, m.context_parallel_size
    if m.sequence_parallel and g.seq_length % tp:
        _fail(f"--sequence-parallel needs --seq-length ({g.seq_length}) divisible by "
              f"--tensor-model-parallel-size ({tp})",
              "--sequence-parallel", "--seq-length", "--tensor-model-parallel-size")
    if cp > 1 and g.seq_length % (2 * cp):
        _fail(f"--context-parallel-size {cp} needs --seq-length ({g.seq_length}) divisible by "
              f"2 x {cp}", "--context-parallel-size", "--seq-length")


def _check_rope_type(run: RunConfig, sizes: DerivedSizes) -> None:
    """YaRN replaces the other RoPE position scalings (they would compound)."""
    m, g = run.model, run.gpt
    if m.rope_type != "yarn":
        return
    if g.position_embedding_type != "rope":
        _fail(f"--rope-type yarn needs --position-embedding-type rope, got "
              f"{g.position_embedding_type}", "--rope-type", "--position-embedding-type")
    if g.use_rope_scaling:
        _fail("--rope-type yarn and --use-rope-scaling are alternatives: give one",
              "--rope-type", "--use-rope-scaling")
    if g.rotary_percent != 1.0:
        _fail(f"--rope-type yarn rotates the whole --qk-pos-emb-head-dim: drop "
              f"--rotary-percent {g.rotary_percent}", "--rope-type", "--rotary-percent")


def _check_pipeline(run: RunConfig, sizes: DerivedSizes) -> None:
    m = run.model
    pp = m.pipeline_model_parallel_size
    first, last = m.num_layers_in_first_pipeline_stage, m.num_layers_in_last_pipeline_stage
    if pp == 1 and (first is not None or last is not None):
        _fail("--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers need "
              "--pipeline-model-parallel-size > 1",
              "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
              "--pipeline-model-parallel-size")
    from megacore.pipeline_parallel.layer_split import pipeline_layer_counts
    from megacore.pipeline_parallel.schedule_plan import validate_pipeline_schedule

    if pp == 1 and m.pipeline_schedule is not None:
        _fail(f"--pipeline-schedule {m.pipeline_schedule} needs "
              "--pipeline-model-parallel-size > 1",
              "--pipeline-schedule", "--pipeline-model-parallel-size")
    if m.pipeline_schedule == "zbv":
        _check_zbv(run)
    try:
        pipeline_layer_counts(m.num_layers, pp, m.virtual_pipeline_model_parallel_size,
                              first, last)
        validate_pipeline_schedule(m.pipeline_schedule, pp,
                                   m.virtual_pipeline_model_parallel_size)
    except ValueError as e:
        raise FlagError(str(e), *_PIPELINE_FLAGS) from e


def _check_zbv(run: RunConfig) -> None:
    """ZBV runs exactly two chunks per rank (the default :mod:`flag_values` derives),
    evenly split, with the output layer untied (its two ends are different chunks of
    rank 0)."""
    from megacore.pipeline_parallel.layer_split import get_layer_offset_and_count

    m, c = run.model, run.checkpoint
    if not run.gpt.untie_embeddings_and_output_weights:
        _fail("--pipeline-schedule zbv needs --untie-embeddings-and-output-weights: the word "
              "embedding (rank 0, chunk 0) and the output layer (rank 0, chunk 1) are "
              "different chunks, and tying them across chunks is not implemented",
              "--pipeline-schedule", "--untie-embeddings-and-output-weights")
    if run.ddp.use_torch_fsdp2:
        _fail("--use-torch-fsdp2 cannot be combined with --pipeline-schedule zbv (its split "
              "backward bypasses FSDP2's backward hooks)",
              "--use-torch-fsdp2", "--pipeline-schedule")
    if c.ckpt_format == "torch" and bool(c.save or c.load):
        _fail("--pipeline-schedule zbv cannot save or load --ckpt-format torch (its files "
              "key chunks by position, which hold other layers in the V); use --ckpt-format "
              "torch_dist", "--pipeline-schedule", "--ckpt-format")
    try:
        get_layer_offset_and_count(m.num_layers, m.pipeline_model_parallel_size, 0,
                                   m.virtual_pipeline_model_parallel_size, 0,
                                   m.num_layers_in_first_pipeline_stage,
                                   m.num_layers_in_last_pipeline_stage, v_shape=True)
    except ValueError as e:
        raise FlagError(str(e), *_PIPELINE_FLAGS) from e


def _check_batch(run: RunConfig, sizes: DerivedSizes) -> None:
    t = run.training
    dp, mbs, gbs = sizes.data_parallel_size, t.micro_batch_size, sizes.global_batch_size
    if t.step_batch_size_schedule is not None:
        _check_step_batch_size_schedule(run, mbs * dp)
    if gbs % (mbs * dp):
        _fail(f"--global-batch-size {gbs} must be divisible by "
              f"--micro-batch-size {mbs} x data-parallel size {dp}",
              "--global-batch-size", "--micro-batch-size")
    vpp = run.model.virtual_pipeline_model_parallel_size
    pp = run.model.pipeline_model_parallel_size
    # ZBV runs any number of micro-batches (schedule_plan.zbv_compute_order).
    if vpp is not None and run.model.pipeline_schedule != "zbv" and sizes.num_microbatches % pp:
        _fail(f"the interleaved schedule needs the number of micro-batches "
              f"(--global-batch-size / (--micro-batch-size x dp) = {sizes.num_microbatches}) "
              f"to be divisible by --pipeline-model-parallel-size {pp}",
              "--global-batch-size", "--micro-batch-size", "--pipeline-model-parallel-size")
    if t.rampup_batch_size is not None:
        start, incr, _ = t.rampup_batch_size
        if start < 1 or incr < 1 or start % (mbs * dp) or incr % (mbs * dp):
            _fail("--rampup-batch-size start and increment must be positive multiples of "
                  f"--micro-batch-size x dp ({mbs * dp})",
                  "--rampup-batch-size", "--micro-batch-size")


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
            raise FlagError(
                f"--step-batch-size-schedule: entry {entry!r} is not THRESHOLD:BATCH_SIZE "
                "(e.g. 0:16 2.4B:320)", "--step-batch-size-schedule")
    return sorted(steps)


def _check_step_batch_size_schedule(run: RunConfig, quantum: int) -> None:
    t = run.training
    steps = parse_step_batch_size_schedule(t.step_batch_size_schedule, run.gpt.seq_length)
    if t.rampup_batch_size is not None:
        _fail("--step-batch-size-schedule and --rampup-batch-size are alternatives; give one",
              "--step-batch-size-schedule", "--rampup-batch-size")
    if not steps or steps[0][0] != 0:
        _fail("--step-batch-size-schedule must start at threshold 0", "--step-batch-size-schedule")
    bad = [b for _, b in steps if b < 1 or b % quantum]
    if bad:
        _fail(f"--step-batch-size-schedule batch size {bad[0]} is not a positive multiple of "
              f"--micro-batch-size x data-parallel size ({quantum})",
              "--step-batch-size-schedule", "--micro-batch-size")
    final = steps[-1][1]
    # Megatron-LM rejects --global-batch-size with a schedule even when they agree (its own
    # GPT-3 example passes both); agreeing values are accepted here.
    if t.global_batch_size is not None and t.global_batch_size != final:
        _fail(f"--global-batch-size {t.global_batch_size} differs from the last batch size "
              f"{final} of --step-batch-size-schedule; drop one or make them agree",
              "--global-batch-size", "--step-batch-size-schedule")


def _check_duration(run: RunConfig, sizes: DerivedSizes) -> None:
    t, s = run.training, run.scheduler
    if (t.train_iters is None) == (t.train_samples is None) and not t.skip_train:
        _fail("give exactly one of --train-iters and --train-samples",
              "--train-iters", "--train-samples")
    if t.train_iters is not None and t.train_iters < 0:
        _fail(f"--train-iters must be >= 0, got {t.train_iters}", "--train-iters")
    if t.train_iters is not None and (s.lr_decay_samples or s.lr_warmup_samples):
        _fail("--lr-decay-samples / --lr-warmup-samples go with --train-samples, not "
              "--train-iters",
              "--lr-decay-samples", "--lr-warmup-samples", "--train-samples", "--train-iters")
    if s.lr_warmup_fraction is not None and s.lr_warmup_iters:
        _fail("--lr-warmup-fraction and --lr-warmup-iters are alternatives; give one",
              "--lr-warmup-fraction", "--lr-warmup-iters")
    decay = s.lr_decay_iters if s.lr_decay_iters is not None else t.train_iters
    if decay is not None and s.lr_warmup_iters > max(decay, 0) and s.lr_decay_style != "constant":
        _fail(f"--lr-warmup-iters {s.lr_warmup_iters} exceeds the decay length {decay} "
              "(--lr-decay-iters or --train-iters)",
              "--lr-warmup-iters", "--lr-decay-iters", "--train-iters")
    if s.lr_decay_style == "WSD" and s.lr_wsd_decay_iters is None \
            and s.lr_wsd_decay_samples is None:
        _fail("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples)",
              "--lr-decay-style", "--lr-wsd-decay-iters", "--lr-wsd-decay-samples")
    if t.train_iters is not None and s.lr_wsd_decay_samples is not None:
        _fail("--lr-wsd-decay-samples goes with --train-samples, not --train-iters",
              "--lr-wsd-decay-samples", "--train-samples", "--train-iters")
    if t.train_samples is not None and s.lr_wsd_decay_iters is not None:
        _fail("--lr-wsd-decay-iters goes with --train-iters; with --train-samples use "
              "--lr-wsd-decay-samples",
              "--lr-wsd-decay-iters", "--train-iters", "--train-samples", "--lr-wsd-decay-samples")
    if t.rampup_batch_size is not None and t.train_samples is None:
        _fail("--rampup-batch-size needs --train-samples (the number of steps is not fixed)",
              "--rampup-batch-size", "--train-samples")


def _check_optimizer(run: RunConfig, sizes: DerivedSizes) -> None:
    o = run.optimizer
    if o.lr is None:
        _fail("--lr is required", "--lr")
    if o.min_lr is not None and o.min_lr > o.lr:
        _fail(f"--min-lr {o.min_lr} is larger than --lr {o.lr}", "--min-lr", "--lr")
    if o.loss_scale is not None and not o.fp16:
        _fail("--loss-scale applies to --fp16 training only", "--loss-scale", "--fp16")


def _check_recompute(run: RunConfig, sizes: DerivedSizes) -> None:
    m = run.model
    if m.recompute_num_layers is not None:
        per_stage = m.num_layers // m.pipeline_model_parallel_size
        if m.recompute_method == "block" and m.recompute_num_layers > per_stage:
            _fail(f"--recompute-num-layers {m.recompute_num_layers} exceeds the "
                  f"{per_stage} layers of a pipeline stage", "--recompute-num-layers")


def _check_data(run: RunConfig, sizes: DerivedSizes) -> None:
    d = run.data
    separate = any(p for p in (d.train_data_path, d.valid_data_path, d.test_data_path))
    if d.mock_data and (d.data_path or separate):
        _fail("--mock-data cannot be combined with --data-path / --train-data-path",
              "--mock-data", "--data-path", "--train-data-path")
    if d.data_path and separate:
        _fail("--data-path (with --split) and --train/valid/test-data-path are alternatives",
              "--data-path", "--train-data-path", "--valid-data-path", "--test-data-path")
    if not (d.mock_data or d.data_path or separate) and not run.training.skip_train:
        _fail("no training data: give --data-path, --train-data-path or --mock-data",
              "--data-path", "--train-data-path", "--mock-data")
    if d.data_path and len(d.data_path) > 1 and len(d.data_path) % 2:
        _fail("--data-path with several datasets must be weight/prefix pairs: "
              "w1 prefix1 w2 prefix2 ...", "--data-path")
    if d.tokenizer_type == "GPT2BPETokenizer" and not (d.vocab_file and d.merge_file):
        _fail("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file",
              "--tokenizer-type", "--vocab-file", "--merge-file")
    if d.tokenizer_type in ("BertWordPieceLowerCase", "BertWordPieceCase") and not d.vocab_file:
        _fail(f"--tokenizer-type {d.tokenizer_type} needs --vocab-file",
              "--tokenizer-type", "--vocab-file")
    if d.tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                            "Llama2Tokenizer", "TikTokenizer", "HuggingFaceTokenizer") \
            and not d.tokenizer_model:
        _fail(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model",
              "--tokenizer-type", "--tokenizer-model")
    if d.tokenizer_type == "NullTokenizer" and not d.vocab_size:
        _fail("--tokenizer-type NullTokenizer needs --vocab-size",
              "--tokenizer-type", "--vocab-size")
    if d.tokenizer_type is None and not d.mock_data:
        _fail("--tokenizer-type is required with real data", "--tokenizer-type")
    if d.mock_data and d.tokenizer_type is None and not d.vocab_size:
        _fail("--mock-data needs a tokenizer or --vocab-size for the vocabulary",
              "--mock-data", "--vocab-size")
    try:
        parse_and_normalize_split(d.split)
    except ValueError as e:
        _fail(str(e), "--split")


def _check_checkpointing(run: RunConfig, sizes: DerivedSizes) -> None:
    c, t = run.checkpoint, run.training
    if c.save_interval is not None and not c.save:
        _fail("--save-interval needs --save", "--save-interval", "--save")
    if c.finetune and not c.load:
        _fail("--finetune needs --load", "--finetune", "--load")
    if t.exit_signal_handler and not c.save:
        _fail("--exit-signal-handler needs --save (it saves a checkpoint on SIGTERM)",
              "--exit-signal-handler", "--save")
    if (c.ckpt_convert_format is None) != (c.ckpt_convert_save is None):
        _fail("--ckpt-convert-format and --ckpt-convert-save go together",
              "--ckpt-convert-format", "--ckpt-convert-save")
    if c.ckpt_convert_format is not None and not c.load:
        _fail("--ckpt-convert-format needs --load (the checkpoint to convert)",
              "--ckpt-convert-format", "--load")
    if c.async_save and not c.save:
        _fail("--async-save needs --save", "--async-save", "--save")


def _check_moe(run: RunConfig, sizes: DerivedSizes) -> None:
    m = run.model
    experts = getattr(m, "num_moe_experts", None)
    ep = m.expert_model_parallel_size
    if ep > 1 and not experts:
        _fail(f"--expert-model-parallel-size {ep} needs --num-experts",
              "--expert-model-parallel-size", "--num-experts")
    if experts and experts % ep:
        _fail(f"--num-experts {experts} must be divisible by --expert-model-parallel-size {ep}",
              "--num-experts", "--expert-model-parallel-size")


def _check_fsdp2(run: RunConfig, sizes: DerivedSizes) -> None:
    if not run.ddp.use_torch_fsdp2:
        return
    m, d, c = run.model, run.ddp, run.checkpoint
    conflicts = [
        (d.use_distributed_optimizer, ("--use-distributed-optimizer",),
         "--use-distributed-optimizer (FSDP2 already shards the optimizer state)"),
        (d.overlap_grad_reduce or d.overlap_param_gather,
         ("--overlap-grad-reduce", "--overlap-param-gather"),
         "--overlap-grad-reduce / --overlap-param-gather (DDP options; FSDP2 overlaps itself)"),
        (m.fp16, ("--fp16",),
         "--fp16 (use --bf16: loss scaling over sharded grads is not implemented)"),
        (m.pipeline_schedule == "zb-h1", ("--pipeline-schedule",),
         "--pipeline-schedule zb-h1 (its split backward bypasses FSDP2's backward hooks)"),
        (m.gradient_accumulation_fusion, ("--gradient-accumulation-fusion",),
         "--gradient-accumulation-fusion (needs DDP's main_grad buffers)"),
        (getattr(m, "moe_grouped_gemm", False), ("--moe-grouped-gemm",),
         "--moe-grouped-gemm (stacked experts cannot be saved under FSDP2)"),
        (c.ckpt_format == "torch" and bool(c.save or c.load), ("--ckpt-format",),
         "--ckpt-format torch (use torch_dist, which reshards FSDP2 checkpoints)"),
    ]
    for bad, flags, what in conflicts:
        if bad:
            _fail(f"--use-torch-fsdp2 cannot be combined with {what}", "--use-torch-fsdp2",
                  *flags)


def _check_requirements(run: RunConfig, sizes: DerivedSizes) -> None:
    """A flag that needs something this run does not have stops here, before training."""
    for flag in FLAGS:
        if flag.kind != NEEDS:
            continue
        value = getattr(getattr(run, flag.section), flag.field)
        default = {f.name: f.default for f in dataclasses.fields(SECTIONS[flag.section])}
        if value != default[flag.field]:
            shown = "" if isinstance(value, bool) else f" {value}"
            _fail(f"{flag.flag}{shown} needs {flag.setting}", flag.flag)


def _check_transformer_impl(run: RunConfig, sizes: DerivedSizes) -> None:
    if run.model.transformer_impl != "transformer_engine":
        return
    from megacore.transformer.extensions import require_transformer_engine

    try:
        require_transformer_engine()
    except RuntimeError as e:
        raise FlagError(str(e), "--transformer-impl") from e
    m = run.model
    if m.num_query_groups < m.tensor_model_parallel_size:
        _fail(f"--transformer-impl transformer_engine needs --num-query-groups "
              f"({m.num_query_groups}) >= --tensor-model-parallel-size "
              f"({m.tensor_model_parallel_size})",
              "--transformer-impl", "--num-query-groups", "--tensor-model-parallel-size")


CHECKS = (_check_requirements, _check_transformer_impl, _check_model_shape, _check_rope_type,
          _check_pipeline, _check_batch, _check_duration, _check_optimizer, _check_recompute,
          _check_data, _check_checkpointing, _check_moe, _check_fsdp2)
"""Every check across configs: ``check(run, sizes)`` raises :class:`FlagError` or returns;
none writes anything, so they hold in any order."""

TRAINING_ONLY_CHECKS = (_check_duration, _check_optimizer, _check_data)
"""The checks of training-only settings (lr, duration, data), skipped for inference."""
