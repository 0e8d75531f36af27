"""Cross-config checks are pure (any order, any number of times, nothing written), the
derived sizes come from one function, errors carry their flags as data, and what a
``--yaml-cfg`` file gives (``load``, ``distributed_backend``) counts like the flag."""

import itertools
import random
import shlex

import pytest

from megacore.config_error import FieldError
from megacore.optimizer import OptimizerConfig
from megacore.training import cli, serving, training
from megacore.training.arguments import (
    FlagError,
    parse_args,
    read_flag_values,
    run_config_to_dict,
)
from megacore.training.config_checks import (
    CHECKS,
    DerivedSizes,
    derive_sizes,
    validate_run_config,
)
from megacore.training.flag_values import build_run_config
from tests.multirank import run_distributed

BASE = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 64 --lr 1e-3 --train-iters 10 --mock-data --vocab-size 128 "
        "--micro-batch-size 2")


def _unvalidated(extra: str):
    """The configs of ``BASE + extra`` before any cross-config check or derivation."""
    return build_run_config(read_flag_values(shlex.split(f"{BASE} {extra}")).values)


def _orders(n: int = 4):
    rng = random.Random(0)
    yield list(CHECKS)
    yield list(reversed(CHECKS))
    for _ in range(n):
        yield rng.sample(list(CHECKS), len(CHECKS))


def test_sizes_are_derived_in_one_function():
    run = _unvalidated("--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2")
    assert run.training.global_batch_size is None
    assert derive_sizes(run, 8) == DerivedSizes(data_parallel_size=2, global_batch_size=4,
                                                num_microbatches=1)
    run = _unvalidated("--train-samples 100 --train-iters 0 "
                       "--step-batch-size-schedule '0:8 1K:16'")
    assert derive_sizes(run, 2) == DerivedSizes(2, 16, 4)  # the schedule's last size


@pytest.mark.parametrize("argv, world", [
    (f"{BASE} --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
     "--num-layers-per-virtual-pipeline-stage 1 --global-batch-size 16", 8),
    (BASE.replace("--train-iters 10", "--train-samples 640") + " --rampup-batch-size 4 4 64", 2),
    (BASE.replace("--train-iters 10", "--train-samples 640")
     + " --step-batch-size-schedule '0:4 1K:8'", 2),
])
def test_checks_write_nothing_and_pass_in_any_order_twice(argv, world):
    run = build_run_config(read_flag_values(shlex.split(argv)).values)
    before = run_config_to_dict(run)
    sizes = derive_sizes(run, world)
    for order in itertools.chain(_orders(), _orders()):
        for check in order:
            check(run, sizes)
        assert run_config_to_dict(run) == before  # no check wrote anything
    validate_run_config(run, world)
    once = run_config_to_dict(run)
    validate_run_config(run, world)  # validating a validated run changes nothing
    assert run_config_to_dict(run) == once
    assert (run.data_parallel_size, run.num_microbatches) == \
        (sizes.data_parallel_size, sizes.num_microbatches)
    assert run.training.global_batch_size == sizes.global_batch_size


@pytest.mark.parametrize("extra, world, message, flags", [
    ("--save-interval 5", 1, "--save-interval needs --save", ("--save-interval", "--save")),
    ("--global-batch-size 6", 2, "must be divisible by", ("--global-batch-size",
                                                         "--micro-batch-size")),
    ("--expert-model-parallel-size 2", 2, "needs --num-experts",
     ("--expert-model-parallel-size", "--num-experts")),
    ("--lr-decay-style WSD", 1, "needs --lr-wsd-decay-iters",
     ("--lr-decay-style", "--lr-wsd-decay-iters", "--lr-wsd-decay-samples")),
])
def test_one_bad_setting_gives_the_same_error_in_any_order(extra, world, message, flags):
    run = _unvalidated(extra)
    sizes = derive_sizes(run, world)
    seen = set()
    for order in _orders():
        with pytest.raises(FlagError) as info:
            for check in order:
                check(run, sizes)
        seen.add((str(info.value), info.value.flags))
    assert len(seen) == 1
    text, got = seen.pop()
    assert message in text and got == flags


@pytest.mark.parametrize("extra, world, flags", [
    ("--clip-grad -1", 1, ("--clip-grad",)),
    ("--ffn-hidden-size 30 --tensor-model-parallel-size 4", 4,
     ("--ffn-hidden-size", "--tensor-model-parallel-size")),
    ("--recompute-granularity full", 1, ("--recompute-granularity", "--recompute-method")),
    ("--tensor-model-parallel-size 3", 4, None),
    ("--fp16 --bf16", 1, ("--fp16", "--bf16")),
    ("--step-batch-size-schedule 0-16", 1, ("--step-batch-size-schedule",)),
])
def test_errors_carry_their_flags(extra, world, flags):
    with pytest.raises(FlagError) as info:
        parse_args(shlex.split(f"{BASE} {extra}"), world_size=world)
    err = info.value
    if flags is None:  # a layout that does not divide the world: the layout flags
        assert "--tensor-model-parallel-size" in err.flags
    else:
        assert err.flags == flags and err.flag == flags[0]
    for flag in err.flags[:1]:
        assert flag in str(err)  # the printed message names the flag to change


def test_config_errors_name_their_fields_and_stay_value_errors():
    with pytest.raises(FieldError) as info:
        OptimizerConfig(lr=1e-3, clip_grad=-1.0)
    assert info.value.fields == ("clip_grad",) and isinstance(info.value, ValueError)


def test_cli_prints_the_flags_of_a_config_error(capsys):
    status = cli.run_program(lambda: parse_args(shlex.split(f"{BASE} --clip-grad -1"),
                                                world_size=1))
    assert status == 2
    assert capsys.readouterr().err == (
        "error: invalid optimizer settings: clip_grad must be >= 0 (0 disables), got -1.0 "
        "[flags: --clip-grad]\n")


# -- --yaml-cfg settings that are read before the configs are built ------------------------
def _save_checkpoint(save_dir: str, config: dict) -> bool:
    from megacore.checkpointing import save_checkpoint
    from tests.checkpointing.test_dist_checkpoint import _reference

    chunks, opt, sched = _reference(1, 1, None)
    save_checkpoint(3, chunks, opt, sched, save_dir=save_dir, ckpt_format="torch",
                    consumed_train_samples=12, consumed_valid_samples=0, config_dict=config)
    return True


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint whose saved run configuration has --hidden-size 64."""
    save_dir = str(tmp_path_factory.mktemp("ckpt") / "run")
    config = run_config_to_dict(parse_args(shlex.split(BASE), world_size=1))
    run_distributed(_save_checkpoint, 1, args=(save_dir, config))
    return save_dir


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_load_from_yaml_reads_the_checkpoint_config(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = shlex.split(BASE.replace("--hidden-size 64", "--hidden-size 32"))
    for given in (["--load", checkpoint], ["--yaml-cfg", _yaml(tmp_path, f"load: {checkpoint}\n")]):
        with pytest.raises(FlagError, match=r"--hidden-size 32 does not match the value 64 "
                                            r"saved in .*run") as info:
            training._parse(argv + given, None)
        assert info.value.flags == ("--hidden-size",)
    # Without the flag the checkpoint's value is taken, from YAML as from the command line.
    no_shape = shlex.split(BASE.replace("--hidden-size 64 ", ""))
    run = training._parse(no_shape + ["--yaml-cfg", _yaml(tmp_path, f"load: {checkpoint}\n")],
                          None)
    assert run.model.hidden_size == 64 and run.checkpoint.load == checkpoint


def test_serving_takes_load_from_yaml(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    run, _ = serving.parse_serving_args(["--yaml-cfg", _yaml(tmp_path, f"load: {checkpoint}\n")])
    assert run.model.hidden_size == 64 and run.checkpoint.load == checkpoint


def test_distributed_backend_from_yaml_reaches_the_process_group(tmp_path, monkeypatch):
    seen = {}

    def stop(backend, timeout_minutes):
        seen.update(backend=backend, timeout=timeout_minutes)
        raise KeyboardInterrupt  # stop before anything starts

    monkeypatch.setattr(training, "initialize_distributed", stop)
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = shlex.split(BASE) + ["--yaml-cfg", _yaml(tmp_path, "distributed_backend: nccl\n"
                                                              "distributed-timeout-minutes: 3\n")]
    with pytest.raises(KeyboardInterrupt):
        training.pretrain(None, None, None, None, argv=argv)
    assert seen == {"backend": "nccl", "timeout": 3}
