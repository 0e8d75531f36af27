"""Megatron-style flags -> configs, --yaml-cfg, and the table of rejected combinations."""

import json
import re
import shlex

import pytest
import torch

from megacore.training import ArgumentValidationError, build_parser, parse_args, run_config_to_dict
from megacore.training.arguments import model_flags_from_config

BASE = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 64 --lr 1e-3 --train-iters 10 --mock-data --vocab-size 128 "
        "--micro-batch-size 2")


def _parse(extra="", world_size=1, base=BASE):
    return parse_args(shlex.split(f"{base} {extra}"), world_size=world_size)


def test_flags_become_configs():
    run = _parse("--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                 "--global-batch-size 16 --swiglu --disable-bias-linear --normalization RMSNorm "
                 "--norm-epsilon 1e-6 --bf16 --use-distributed-optimizer --overlap-grad-reduce "
                 "--num-query-groups 2 --group-query-attention --position-embedding-type rope "
                 "--untie-embeddings-and-output-weights --lr-decay-style cosine --seed 7",
                 world_size=8)
    m = run.model
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size) == (2, 2)
    assert m.gated_linear_unit and m.activation_func is torch.nn.functional.silu
    assert m.add_bias_linear is False and m.normalization == "RMSNorm"
    assert m.layernorm_epsilon == 1e-6 and m.num_query_groups == 2
    assert m.params_dtype is torch.bfloat16 and run.optimizer.bf16
    assert run.optimizer.use_distributed_optimizer and run.ddp.use_distributed_optimizer
    assert run.ddp.overlap_grad_reduce
    assert run.gpt.position_embedding_type == "rope"
    assert run.gpt.untie_embeddings_and_output_weights
    assert run.data_parallel_size == 2 and run.num_microbatches == 4
    assert run.scheduler.lr_decay_style == "cosine" and run.training.seed == 7
    json.dumps(run_config_to_dict(run))  # the resolved config is JSON-able


def test_virtual_stages_from_layers_per_stage():
    run = _parse("--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 "
                 "--global-batch-size 4", world_size=2)
    assert run.model.virtual_pipeline_model_parallel_size == 2


def test_zbv_sets_two_virtual_stages():
    # --pipeline-schedule zbv fixes vpp at 2: unset, it is set; 2 is accepted.
    for extra in ("", "--num-virtual-stages-per-pipeline-rank 2"):
        run = _parse("--pipeline-model-parallel-size 2 --pipeline-schedule zbv "
                     f"--untie-embeddings-and-output-weights {extra}", world_size=2)
        assert run.model.virtual_pipeline_model_parallel_size == 2
        assert run.model.pipeline_schedule == "zbv"


def test_global_batch_defaults_to_micro_times_dp():
    run = _parse(world_size=4)
    assert run.training.global_batch_size == 8 and run.num_microbatches == 1


def test_yaml_cfg_with_command_line_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("hidden_size: 32\nnum-attention-heads: 2\nlr: 0.5\nseed: 3\n")
    run = parse_args(shlex.split(f"{BASE} --yaml-cfg {cfg} --seed 9"), world_size=1)
    assert run.model.hidden_size == 64  # BASE gives --hidden-size on the command line
    assert run.training.seed == 9
    run = parse_args(shlex.split("--num-layers 2 --seq-length 8 --train-iters 1 --mock-data "
                                 f"--vocab-size 16 --yaml-cfg {cfg}"), world_size=1)
    assert run.model.hidden_size == 32 and run.optimizer.lr == 0.5 and run.training.seed == 3


def test_yaml_cfg_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("not_a_setting: 1\n")
    with pytest.raises(ArgumentValidationError, match=r"bad\.yaml: unknown setting 'not_a_setting'"):
        parse_args(shlex.split(f"{BASE} --yaml-cfg {bad}"), world_size=1)


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        _parse("--no-such-flag 3")
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_help_text_comes_from_field_docstrings():
    text = build_parser().format_help()
    assert "Ranks that split every weight matrix" in text  # ModelParallelConfig docstring
    assert "--global-batch-size" in text and "--yaml-cfg" in text


# (extra flags, world size, expected message fragment)
BAD = [
    ("--tensor-model-parallel-size 4", 6, "--tensor-model-parallel-size=4"),
    ("--pipeline-model-parallel-size 3", 6, "--num-layers"),
    ("--context-parallel-size 3", 4, "--context-parallel-size=3"),
    ("--fp16 --bf16", 1, "--fp16 and --bf16 are mutually exclusive"),
    ("--global-batch-size 5", 2, "--global-batch-size 5 must be divisible"),
    ("--train-samples 100", 1, "exactly one of --train-iters and --train-samples"),
    ("--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 "
     "--global-batch-size 6", 2, "divisible by --pipeline-model-parallel-size 2"),
    ("--num-layers-per-virtual-pipeline-stage 1", 1,
     "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"),
    ("--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 3", 2,
     "--num-layers 4 must be divisible"),
    ("--num-attention-heads 3", 1, "num_attention_heads"),
    ("--tensor-model-parallel-size 8 --num-attention-heads 4", 8, "num_attention_heads"),
    ("--num-query-groups 3", 1, "num_query_groups"),
    ("--group-query-attention", 1, "--group-query-attention needs --num-query-groups"),
    ("--max-position-embeddings 16", 1, "--seq-length 32 exceeds --max-position-embeddings 16"),
    ("--tensor-model-parallel-size 2 --sequence-parallel --seq-length 33 "
     "--max-position-embeddings 64", 2, "--seq-length (33) divisible by"),
    ("--context-parallel-size 2 --seq-length 30", 2, "divisible by 2 x 2"),
    ("--decoder-first-pipeline-num-layers 1", 1, "need --pipeline-model-parallel-size > 1"),
    ("--use-torch-fsdp2 --use-distributed-optimizer", 2,
     "--use-torch-fsdp2 cannot be combined with --use-distributed-optimizer"),
    ("--use-torch-fsdp2 --fp16", 2, "--use-torch-fsdp2 cannot be combined with --fp16"),
    ("--use-torch-fsdp2 --overlap-grad-reduce", 2, "--overlap-grad-reduce / --overlap-param-gather"),
    ("--use-torch-fsdp2 --pipeline-model-parallel-size 2 --pipeline-schedule zb-h1", 2,
     "--use-torch-fsdp2 cannot be combined with --pipeline-schedule zb-h1"),
    ("--use-torch-fsdp2 --save x --ckpt-format torch", 2, "--ckpt-format torch (use torch_dist"),
    ("--fsdp-reshard-after-forward", 2, "fsdp_reshard_after_forward=True needs use_torch_fsdp2"),
    ("--pipeline-schedule zb-h1", 1, "--pipeline-schedule zb-h1 needs --pipeline-model-parallel-size > 1"),
    ("--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 "
     "--global-batch-size 4 --pipeline-schedule zb-h1", 2,
     "--pipeline-schedule zb-h1 runs one model chunk per rank"),
    ("--pipeline-schedule zbv", 1, "--pipeline-schedule zbv needs --pipeline-model-parallel-size > 1"),
    ("--pipeline-model-parallel-size 2 --pipeline-schedule zbv", 2,
     "--pipeline-schedule zbv needs --untie-embeddings-and-output-weights"),
    ("--pipeline-model-parallel-size 2 --pipeline-schedule zbv --untie-embeddings-and-output-weights "
     "--num-virtual-stages-per-pipeline-rank 4 --num-layers 8 --global-batch-size 4", 2,
     "--pipeline-schedule zbv places exactly 2 model chunks per rank"),
    ("--pipeline-model-parallel-size 2 --pipeline-schedule zbv --untie-embeddings-and-output-weights "
     "--decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 3", 2,
     "drop --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers"),
    ("--pipeline-model-parallel-size 2 --pipeline-schedule zbv --untie-embeddings-and-output-weights "
     "--num-layers 6", 2, "pipeline rank 0 holds 3 layers"),
    ("--use-torch-fsdp2 --pipeline-model-parallel-size 2 --pipeline-schedule zbv "
     "--untie-embeddings-and-output-weights", 2,
     "--use-torch-fsdp2 cannot be combined with --pipeline-schedule zbv"),
    ("--pipeline-model-parallel-size 2 --pipeline-schedule zbv --untie-embeddings-and-output-weights "
     "--save x --ckpt-format torch", 2, "--pipeline-schedule zbv cannot save or load --ckpt-format torch"),
    ("--recompute-method uniform", 1, "apply only to recompute_granularity='full'"),
    ("--recompute-granularity full", 1,
     "needs recompute_method 'uniform' or 'block' [flags: --recompute-granularity, --recompute-method]"),
    ("--lr 1e-3 --min-lr 1e-2", 1, "--min-lr 0.01 is larger than --lr"),
    ("--overlap-param-gather", 1, "needs use_distributed_optimizer=True"),
    ("--loss-scale 128", 1, "--loss-scale applies to --fp16"),
    ("--lr-warmup-iters 20", 1, "--lr-warmup-iters 20 exceeds the decay length 10"),
    ("--lr-warmup-iters 2 --lr-warmup-fraction 0.1", 1, "are alternatives"),
    ("--lr-decay-style WSD", 1, "needs --lr-wsd-decay-iters"),
    ("--save-interval 5", 1, "--save-interval needs --save"),
    ("--finetune", 1, "--finetune needs --load"),
    ("--exit-signal-handler", 1, "--exit-signal-handler needs --save"),
    ("--ckpt-convert-format torch", 1, "go together"),
    ("--async-save", 1, "--async-save needs --save"),
    ("--expert-model-parallel-size 2", 2, "needs --num-experts"),
    ("--data-path a b c", 1, "--mock-data cannot be combined"),
    ("--micro-batch-size 0", 1, "micro_batch_size must be >= 1"),
    ("--rampup-batch-size 2 2", 1, "rampup_batch_size needs three numbers"),
    ("--log-interval 0", 1, "log_interval must be >= 1"),
    ("--eval-iters -1", 1, "eval_iters must be >= 0"),
    ("--ffn-hidden-size 30 --tensor-model-parallel-size 4", 4,
     "[flags: --ffn-hidden-size, --tensor-model-parallel-size]"),
    ("--split 1,2,3,4", 1, "--split '1,2,3,4'"),
    ("--clip-grad -1", 1, "clip_grad must be >= 0 (0 disables), got -1.0 [flags: --clip-grad]"),
]


@pytest.mark.parametrize("extra, world, message", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_combinations_are_rejected_naming_flags(extra, world, message):
    with pytest.raises(ArgumentValidationError) as info:
        _parse(extra, world_size=world)
    assert message in str(info.value), str(info.value)


DATA_BAD = [
    ("--data-path x --train-data-path y --tokenizer-type NullTokenizer --vocab-size 8",
     "are alternatives"),
    ("--data-path 1 a 2", "weight/prefix pairs"),
    ("--data-path x --tokenizer-type GPT2BPETokenizer", "needs --vocab-file and --merge-file"),
    ("--data-path x --tokenizer-type SentencePieceTokenizer", "needs --tokenizer-model"),
    ("--data-path x", "--tokenizer-type is required"),
    ("", "no training data"),
]


@pytest.mark.parametrize("extra, message", DATA_BAD)
def test_bad_data_flags(extra, message):
    base = BASE.replace("--mock-data --vocab-size 128", "")
    with pytest.raises(ArgumentValidationError) as info:
        _parse(extra, base=base)
    assert message in str(info.value), str(info.value)


def _rejection(extra, world, base=BASE):
    with pytest.raises(ArgumentValidationError) as info:
        _parse(extra, world_size=world, base=base)
    return str(info.value)


def test_every_rejection_names_real_flags():
    """Every rejected combination names at least one flag, and every flag it names exists:
    the message speaks of the command line the user typed, not of config fields."""
    known = {option for action in build_parser()._actions for option in action.option_strings}
    data_base = BASE.replace("--mock-data --vocab-size 128", "")
    cases = [(extra, world, BASE) for extra, world, _ in BAD] + \
        [(extra, 1, data_base) for extra, _ in DATA_BAD]
    for extra, world, base in cases:
        message = _rejection(extra, world, base)
        # "--train/valid/test-data-path" names three flags
        message = message.replace("--train/valid/test-data-path",
                                  "--train-data-path --valid-data-path --test-data-path")
        named = set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", message))
        assert named, f"{extra!r} -> {message!r} names no flag"
        assert named <= known, (extra, named - known)


def test_moe_layer_freq_takes_effect_and_round_trips_through_a_checkpoint_config():
    # Regression: the flag's value was read under another key and silently dropped (1).
    base = ("--num-layers 4 --hidden-size 16 --num-attention-heads 2 --seq-length 8 "
            "--max-position-embeddings 8 --micro-batch-size 1 --lr 1e-3 --train-iters 1 "
            "--mock-data --vocab-size 32 --num-experts 2 --moe-ffn-hidden-size 16 ").split()
    assert parse_args(base + ["--moe-layer-freq", "1,0,1,0"]).model.moe_layer_freq == [1, 0, 1, 0]
    assert parse_args(base + ["--moe-layer-freq", "[0,1,0,1]"]).model.moe_layer_freq == [0, 1, 0, 1]
    run = parse_args(base + ["--moe-layer-freq", "2"])
    assert run.model.moe_layer_freq == 2
    flags = model_flags_from_config(run_config_to_dict(run))
    assert flags[flags.index("--moe-layer-freq") + 1] == "2"


def test_attention_backend_flags():
    from megacore.transformer import AttnBackend

    assert _parse().model.attention_backend is AttnBackend.auto
    run = _parse("--attention-backend unfused --layout-independent-attention-dropout")
    assert run.model.attention_backend is AttnBackend.unfused
    assert run.model.layout_independent_attention_dropout
    assert run_config_to_dict(run)["model"]["attention_backend"] == "unfused"
    with pytest.raises(ArgumentValidationError, match="--attention-backend"):
        _parse("--attention-backend flash --layout-independent-attention-dropout")


def test_compile_layers_flag():
    assert not _parse().model.compile_layers
    assert _parse("--compile-layers").model.compile_layers
