"""Megatron-LM flag parity: the generated flag table, one parse test per row of ``FLAGS``,
and behaviour tests for the flags implemented or mapped for Megatron-LM's launch scripts.

The launch scripts themselves run in tests/training/test_megatron_scripts.py.
"""

import dataclasses
import gc
import glob
import os
import shlex

import pytest
import torch

from megacore import device
from megacore.optimizer import OptimizerConfig, get_param_groups
from megacore.training import arguments
from megacore.training.arguments import (
    FLAGS,
    IMPLEMENTED,
    MAPPED,
    NEEDS,
    NO_EFFECT,
    ArgumentValidationError,
    build_parser,
    parse_args,
)
from megacore.training.flag_table import flag_table_markdown
from megacore.transformer import AttnBackend, TransformerConfig
from megacore.transformer.torch_norm import LayerNorm, RMSNorm
from tests.multirank import run_distributed
from tests.training.test_pretrain_gpt import ROOT, _example

BASE = shlex.split("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
                   "--max-position-embeddings 16 --lr 1e-3 --train-iters 3 --mock-data "
                   "--vocab-size 97")


def test_committed_flag_table_is_the_generated_one():
    with open(os.path.join(ROOT, "docs", "megatron_flags.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == flag_table_markdown(), \
        "regenerate: python -m megacore.training.flag_table > docs/megatron_flags.md"


def test_flags_are_unique_and_unknown_flags_still_fail():
    names = [f.flag for f in FLAGS]
    assert len(names) == len(set(names))
    with pytest.raises(SystemExit):
        build_parser().parse_args(BASE + ["--no-such-megatron-flag"])


def _sample(flag):
    """A value to pass for a row: (argv tail, parsed value)."""
    kind, _ = arguments._field_info(flag)
    if kind is bool and flag.nargs is None:
        return [flag.flag], True
    if flag.choices:
        raw = [str(flag.choices[-1])]
    else:
        raw = {int: ["3"], float: ["0.5"]}.get(kind, ["x"])
    if flag.nargs in ("*", "+"):
        raw = raw * 2
    cast = kind or str
    parsed = [cast(v) for v in raw] if flag.nargs in ("*", "+") else cast(raw[0])
    return [flag.flag] + raw, parsed


@pytest.mark.parametrize("flag", FLAGS, ids=[f.flag for f in FLAGS])
def test_every_row_parses_into_its_setting(flag):
    """Each flag parses, and a non-derived one lands in the config field its row names
    (inverted for --no-* rows); derived rows are checked by the behaviour tests below."""
    tail, parsed = _sample(flag)
    ns = build_parser().parse_args(BASE + tail)
    values = {k: v for k, v in vars(ns).items() if v is not None and v is not False}
    assert values[arguments._dest(flag)] == parsed
    if flag.derived:
        return
    kwargs = arguments._section_kwargs(values)
    assert kwargs[flag.section][flag.field] == ((not parsed) if flag.invert else parsed)
    assert dataclasses.is_dataclass(arguments.SECTIONS[flag.section])
    assert flag.field in {f.name for f in dataclasses.fields(arguments.SECTIONS[flag.section])}


NO_EFFECT_ROWS = [f for f in FLAGS if f.kind == NO_EFFECT]
NEEDS_ROWS = [f for f in FLAGS if f.kind == NEEDS]


def test_no_effect_flags_are_reported_in_one_line():
    argv = BASE + [t for f in NO_EFFECT_ROWS for t in _sample(f)[0]]
    run = parse_args(argv, world_size=1)
    lines = [n for n in run.notes if "no effect on this backend" in n]
    assert len(lines) == 1
    for flag in NO_EFFECT_ROWS:
        assert flag.flag in lines[0]
    plain = parse_args(BASE, world_size=1)
    assert not [n for n in plain.notes if "no effect" in n]


@pytest.mark.parametrize("flag", NEEDS_ROWS, ids=[f.flag for f in NEEDS_ROWS])
def test_flags_needing_transformer_engine_stop_before_training(flag):
    with pytest.raises(ArgumentValidationError, match=f"{flag.flag}.* needs Transformer Engine"):
        parse_args(BASE + _sample(flag)[0], world_size=1)


# -- mapped rows and Megatron's validation semantics ----------------------------------
def test_mapped_aliases():
    run = parse_args(BASE + ["--recompute-activations", "--use-flash-attn", "--bf16"],
                     world_size=1)
    assert run.model.recompute_granularity == "selective"
    assert run.model.attention_backend == AttnBackend.flash
    assert run.ddp.grad_reduce_in_fp32, "bf16 reduces grads in fp32 by default (Megatron)"
    run = parse_args(BASE + ["--bf16", "--grad-reduce-in-bf16", "--no-gradient-accumulation-fusion",
                             "--use-pytorch-profiler", "--log-throughput",
                             "--no-create-attention-mask-in-dataloader"], world_size=1)
    assert not run.ddp.grad_reduce_in_fp32
    assert not run.model.gradient_accumulation_fusion
    with pytest.raises(ArgumentValidationError, match="--grad-reduce-in-bf16 needs --bf16"):
        parse_args(BASE + ["--grad-reduce-in-bf16"], world_size=1)
    with pytest.raises(ArgumentValidationError, match="contradicts --recompute-granularity full"):
        parse_args(BASE + ["--recompute-activations", "--recompute-granularity", "full",
                           "--recompute-method", "uniform"], world_size=1)


def test_megatron_validation_semantics():
    vocab = os.path.join(ROOT, "examples", "data", "vocab.json")
    merges = os.path.join(ROOT, "examples", "data", "merges.txt")
    run = parse_args([a for a in BASE if a not in ("--mock-data",)] +
                     ["--data-path", "x", "--vocab-file", vocab, "--merge-file", merges],
                     world_size=1)
    assert run.data.tokenizer_type == "GPT2BPETokenizer"
    run = parse_args(BASE + ["--sequence-parallel"], world_size=1)
    assert not run.model.sequence_parallel
    assert run.notes == ["WARNING: --sequence-parallel needs --tensor-model-parallel-size > 1; "
                         "disabled (as Megatron-LM does)"]
    run = parse_args(BASE + ["--no-load-optim", "--no-load-rng"], world_size=1)
    assert run.checkpoint.no_load_optim and run.checkpoint.no_load_rng
    for kind in ("Llama2Tokenizer", "GPTSentencePieceTokenizer", "TikTokenizer"):
        run = parse_args(BASE + ["--tokenizer-type", kind, "--tokenizer-model", "m"],
                         world_size=1)
        assert run.data.tokenizer_type == kind
    run = parse_args(BASE + ["--tiktoken-pattern", "v2", "--tokenizer-type", "NullTokenizer"],
                     world_size=1)
    assert any("--tiktoken-pattern has no effect with --tokenizer-type NullTokenizer" in n
               for n in run.notes)


def test_use_checkpoint_args_takes_the_checkpoint_model_settings():
    saved = arguments.run_config_to_dict(parse_args(BASE + ["--apply-layernorm-1p"],
                                                    world_size=1))
    argv = [a if a != "32" else "64" for a in BASE]  # --hidden-size 64 disagrees
    with pytest.raises(ArgumentValidationError, match="--hidden-size 64 does not match the value "
                                                      "32.*--use-checkpoint-args"):
        parse_args(argv, world_size=1, checkpoint_config=saved, checkpoint_path="ckpt")
    run = parse_args(argv + ["--use-checkpoint-args"], world_size=1, checkpoint_config=saved,
                     checkpoint_path="ckpt")
    assert run.model.hidden_size == 32
    assert run.model.layernorm_zero_centered_gamma, "--apply-layernorm-1p comes with the weights"
    assert "WARNING: --hidden-size 64: replaced by the value 32 saved in ckpt " \
           "(--use-checkpoint-args)" in run.notes


def test_step_batch_size_schedule():
    argv = BASE + ["--micro-batch-size", "2", "--step-batch-size-schedule", "0:4 0.064K:8"]
    run = parse_args(argv, world_size=1)
    assert run.training.global_batch_size == 8
    from megacore.training.training import microbatch_calculator

    calc = microbatch_calculator(run)  # 64 tokens = 4 samples of 16
    assert [calc.global_batch_size_at(s) for s in (0, 3, 4, 100)] == [4, 4, 8, 8]
    assert [calc.num_microbatches_at(s) for s in (0, 4)] == [2, 4]
    parse_args(argv + ["--global-batch-size", "8"], world_size=1)  # agreeing: accepted
    with pytest.raises(ArgumentValidationError, match="--global-batch-size 16 differs"):
        parse_args(argv + ["--global-batch-size", "16"], world_size=1)
    with pytest.raises(ArgumentValidationError, match="not a positive multiple"):
        parse_args(BASE + ["--micro-batch-size", "2", "--step-batch-size-schedule", "0:3 1K:8"],
                   world_size=1)


def test_sample_based_schedule_flags():
    from megacore.training.training import get_optimizer_param_scheduler

    run = parse_args([a for a in BASE if a not in ("--train-iters", "3")] + [
        "--train-samples", "64", "--global-batch-size", "8", "--lr-decay-samples", "48",
        "--lr-warmup-samples", "8", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "16"],
        world_size=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_optimizer_param_scheduler(run, opt)
    assert (sched.lr_decay_steps, sched.lr_warmup_steps, sched.wsd_decay_steps) == (48, 8, 16)


# -- implemented rows: numerics and behaviour -----------------------------------------
@pytest.mark.parametrize("norm_cls, reference", [
    (LayerNorm, lambda x, w, b: torch.nn.functional.layer_norm(x, (8,), w, b, 1e-5)),
    (RMSNorm, lambda x, w, b: torch.nn.functional.rms_norm(x, (8,), w, 1e-5)),
])
def test_apply_layernorm_1p_is_a_zero_centered_gamma(norm_cls, reference):
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               layernorm_zero_centered_gamma=True)
    norm = norm_cls(config, 8)
    assert torch.equal(norm.weight, torch.zeros(8)), "stored gamma - 1 starts at 0"
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, 8))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.linspace(0.1, 0.2, 8))
    x = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = norm(x)
    w = (norm.weight.detach() + 1).requires_grad_()
    b = norm.bias.detach().clone() if getattr(norm, "bias", None) is not None else None
    x2 = x.detach().clone().requires_grad_()
    expected = reference(x2, w, b)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # same kernel, same inputs
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(norm.weight.grad, w.grad, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)


def test_decoupled_lr_applies_to_embedding_and_output_params():
    run = parse_args(BASE + ["--untie-embeddings-and-output-weights", "--decoupled-lr", "5e-3",
                             "--decoupled-min-lr", "5e-4", "--min-lr", "1e-4"], world_size=1)
    model = run_distributed(_decoupled_groups, 1, args=(run,))[0]
    assert model == {"decoupled": (0.005, 0.0005, 2), "other": (0.001, 0.0001)}


def _decoupled_groups(run):
    from megacore import parallel_state

    parallel_state.initialize_model_parallel()
    gpt = _example().model_provider(run)
    groups = get_param_groups([gpt], run.optimizer)
    decoupled = [g for g in groups if g["max_lr"] == run.optimizer.decoupled_lr]
    marked = {id(p) for p in gpt.parameters() if getattr(p, "is_embedding_or_output_parameter",
                                                         False)}
    assert {id(p) for g in decoupled for p in g["params"]} == marked
    other = {(g["max_lr"], g["min_lr"]) for g in groups if g not in decoupled}
    assert len(other) == 1
    return {"decoupled": (decoupled[0]["max_lr"], decoupled[0]["min_lr"], len(marked)),
            "other": other.pop()}


def _housekeeping_run(argv, profile_dir):
    """Run pretrain counting gc.collect / empty_cache calls and recording whether automatic
    garbage collection was on during each forward step."""
    counts = {"collect": 0, "empty_cache": 0}
    real_collect, real_empty = gc.collect, device.empty_cache

    def collect(*a):
        counts["collect"] += 1
        return real_collect(*a)

    def empty():
        counts["empty_cache"] += 1
        return real_empty()

    gc.collect, device.empty_cache = collect, empty
    example = _example()
    enabled = []
    forward_step = example.forward_step

    def recording_forward_step(data_iterator, model):
        enabled.append(gc.isenabled())
        return forward_step(data_iterator, model)

    try:
        summary = example.pretrain(example.train_valid_test_datasets_provider,
                                   example.model_provider, None, recording_forward_step,
                                   argv=argv)
    finally:
        gc.collect, device.empty_cache = real_collect, real_empty
    traces = glob.glob(os.path.join(profile_dir, "*.pt.trace.json"))
    return summary, counts, enabled, gc.isenabled(), traces


def test_manual_gc_memory_level_profile_rampup_train_samples(tmp_path):
    log = tmp_path / "log.jsonl"
    argv = [a for a in BASE if a not in ("--train-iters", "3")] + shlex.split(
        "--train-samples 40 --micro-batch-size 2 --global-batch-size 8 --rampup-batch-size 4 4 8 "
        "--lr-decay-samples 40 --lr-warmup-samples 8 --log-interval 1 --eval-iters 0 "
        "--manual-gc --manual-gc-interval 2 --empty-unused-memory-level 1 --profile "
        f"--profile-step-start 1 --profile-step-end 3 --tensorboard-dir {tmp_path / 'tb'} "
        f"--log-jsonl {log}")
    summary, counts, enabled, after, traces = run_distributed(
        _housekeeping_run, 1, args=(argv, str(tmp_path / "tb")), timeout=240)[0]
    import json

    records = [json.loads(line) for line in open(log)]
    # Ramp-up: 4 samples per step until 8 are consumed, then 8; 40 samples in 6 steps.
    assert [r["global_batch_size"] for r in records] == [4, 4, 8, 8, 8, 8]
    assert summary["iteration"] == 6 and summary["consumed_train_samples"] == 40
    assert not any(enabled), "automatic gc is off during training with --manual-gc"
    assert after, "and back on afterwards"
    assert counts["collect"] == 1 + 3, "once at start, then every 2nd of 6 steps"
    assert counts["empty_cache"] == 6, "after every step (level 1)"
    assert len(traces) == 1, traces
    with open(traces[0]) as f:
        trace = f.read()
    assert "ProfilerStep" in trace or "aten::" in trace


def test_exit_duration_in_mins(tmp_path):
    argv = BASE + shlex.split("--train-iters 50 --exit-duration-in-mins 1e-9 --eval-iters 0")
    summary = run_distributed(_housekeeping_run, 1, args=(argv, str(tmp_path)),
                              timeout=240)[0][0]
    assert summary["exit_reason"] == "exit-duration" and summary["iteration"] == 1


@pytest.mark.parametrize("flags, mmapped", [([], True), (["--no-mmap-bin-files"], False)])
def test_no_mmap_bin_files_reads_the_data_into_memory(tmp_path, flags, mmapped):
    from tools import preprocess_data

    corpus = tmp_path / "corpus.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "demo_corpus.jsonl")) as f:
        corpus.write_text("".join(f.readlines()[:40]))
    vocab = os.path.join(ROOT, "examples", "data", "vocab.json")
    merges = os.path.join(ROOT, "examples", "data", "merges.txt")
    assert preprocess_data.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "d"),
                                 "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                                 "--merge-file", merges, "--append-eod", "--workers", "1"]) == 0
    argv = [a for a in BASE if a not in ("--mock-data", "--vocab-size", "97")] + [
        "--data-path", str(tmp_path / "d_text_document"), "--split", "1,0,0",
        "--vocab-file", vocab, "--merge-file", merges] + flags
    run = parse_args(argv, world_size=1)
    train, _, _ = _example().train_valid_test_datasets_provider(run, [4, 0, 0])
    assert train.dataset.mmap is mmapped
    assert len(train[0]["tokens"]) == 16


def test_no_flag_listed_as_unsupported_is_accepted():
    """docs/megatron_unsupported_flags.md (Megatron-LM flags megacore refuses, with why)
    must not list a flag the parser accepts: implementing one means moving it out."""
    import re

    with open(os.path.join(ROOT, "docs", "megatron_unsupported_flags.md"), encoding="utf-8") as f:
        # The flag lists are the lines made of backquoted flags (the reasons may name
        # megacore flags that replace them).
        listed = {flag for line in f if line.startswith("`--")
                  for flag in re.findall(r"`(--[a-z0-9-]+)`", line)}
    accepted = {o for action in build_parser()._actions for o in action.option_strings}
    assert len(listed) > 300
    assert not listed & accepted, sorted(listed & accepted)
