"""examples/pretrain_gpt.py end to end: every layout reproduces the single-rank losses.

The layout matrix runs ``pretrain`` in forked gloo ranks (fast start); one test drives the
script through ``torchrun`` exactly as a user would. Tolerance for layouts: rtol 1e-5 on
losses after several Adam steps, because sharded matmuls and all-reduces sum in a
different order than one process (observed differences ~1e-7); deterministic mode and
same-layout reruns are compared bitwise.
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from tests.multirank import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_gpt.py")

MODEL = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 8 --lr 1e-2 "
         "--train-iters 5 --mock-data --vocab-size 97 --log-interval 1 --eval-iters 0 "
         "--hidden-dropout 0 --attention-dropout 0 --seed 5 --lr-warmup-iters 1 "
         "--log-params-norm")


def _example():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_pretrain(argv):
    return _example().main(argv)


def _losses(path):
    with open(path) as f:
        records = [r for r in map(json.loads, f) if "lm_loss" in r]  # skip validation records
    return [r["lm_loss"] for r in records], [(r["grad_norm"], r["params_norm"]) for r in records]


def _train(tmp_path, name, world, extra=""):
    log = tmp_path / f"{name}.jsonl"
    argv = shlex.split(f"{MODEL} {extra} --log-jsonl {log}")
    run_distributed(_run_pretrain, world, args=(argv,), timeout=240)
    return _losses(log)


LAYOUTS = [
    ("tp2", 2, "--tensor-model-parallel-size 2"),
    ("tp2_sp", 2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    ("pp2", 2, "--pipeline-model-parallel-size 2"),
    ("pp2_vpp2", 2, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1"),
    ("dp2", 2, ""),
    ("dp2_distopt", 2, "--use-distributed-optimizer"),
    ("cp2", 2, "--context-parallel-size 2"),
    ("cp2_tp2", 4, "--context-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel"),
    ("tp2_pp2", 4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2"),
    ("tp2_dp2_distopt_sp", 4, "--tensor-model-parallel-size 2 --sequence-parallel "
                              "--use-distributed-optimizer --overlap-grad-reduce"),
    # Zero bubble: tp linears split B/W, W steps feed the distributed optimizer's buffers.
    ("tp2_pp2_sp_zbh1", 4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                           "--sequence-parallel --pipeline-schedule zb-h1 "
                           "--use-distributed-optimizer"),
    # FSDP2 (ZeRO-3) over dp 2 with tp 2 + sp: grad norm and clipping over DTensor shards.
    ("tp2_sp_dp2_fsdp2", 4, "--tensor-model-parallel-size 2 --sequence-parallel "
                            "--use-torch-fsdp2 --fsdp-reshard-after-forward"),
    ("pp2_dp2_fsdp2", 4, "--pipeline-model-parallel-size 2 --use-torch-fsdp2"),
    # Interleaved FSDP2: each chunk's no-sync hook (one reduce-scatter per step) closes
    # before that chunk's last backward.
    ("pp2_vpp2_dp2_fsdp2", 4, "--pipeline-model-parallel-size 2 "
                              "--num-layers-per-virtual-pipeline-stage 1 --use-torch-fsdp2"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ref"), "ref", 1)


@pytest.mark.parametrize("name, world, extra", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_layout_losses_equal_single_rank(reference, tmp_path, name, world, extra):
    ref_losses, ref_norms = reference
    losses, norms = _train(tmp_path, name, world, extra)
    assert len(losses) == len(ref_losses) == 5
    assert ref_losses[-1] < ref_losses[0], "the reference run should be learning"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    # (grad norm, params norm) per iteration; grad norms sum squares in another order: 1e-4.
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=0)


def test_deterministic_mode_is_bitwise_reproducible(tmp_path):
    extra = "--tensor-model-parallel-size 2 --deterministic-mode --hidden-dropout 0.1"
    first = _train(tmp_path, "a", 2, extra)
    second = _train(tmp_path, "b", 2, extra)
    assert first == second


def test_torchrun_drives_the_script(tmp_path):
    """The user-facing path: torchrun, 4 gloo ranks, tp=2 x pp=2, JSONL log and stdout lines."""
    log = tmp_path / "torchrun.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           SCRIPT] + shlex.split(MODEL) + shlex.split(
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --eval-iters 1 "
        f"--eval-interval 5 --log-jsonl {log}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "iteration        5/       5" in proc.stdout
    assert "validation loss at iteration 5" in proc.stdout
    losses, _ = _losses(log)
    assert len(losses) == 5 and all(isinstance(x, float) for x in losses)
    records = [json.loads(line) for line in open(log)]
    assert any("validation_lm_loss" in r for r in records)
    for key in ("iteration", "lm_loss", "lr", "grad_norm", "tokens_per_sec", "consumed_samples"):
        assert key in records[0], key


def test_bad_flag_exits_with_message(tmp_path):
    cmd = [sys.executable, SCRIPT] + shlex.split(MODEL) + ["--global-batch-size", "7"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "--global-batch-size 7 must be divisible" in proc.stderr


def test_checkpointed_run_config_holds_no_hooks(tmp_path):
    """Hooks are arguments of the schedules (built per step), not configuration: the config
    saved with a checkpoint carries none of the deprecated hook fields."""
    from megacore.model_parallel_config import DEPRECATED_HOOK_FIELDS
    from megacore.training.training import saved_run_config

    save = tmp_path / "ckpt"
    _train(tmp_path, "saved", 1, f"--save {save} --save-interval 5")
    model = saved_run_config(str(save))["model"]
    assert model["num_layers"] == 4
    assert not set(DEPRECATED_HOOK_FIELDS) & set(model)
    assert "timers" not in saved_run_config(str(save))["optimizer"]


def _simple_loop():
    spec = importlib.util.spec_from_file_location(
        "simple_loop", os.path.join(ROOT, "examples", "run_simple_train_loop.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main()


def test_simple_train_loop_example_learns():
    histories = run_distributed(_simple_loop, 2, timeout=240)
    first, last = histories[0][0], histories[0][-1]
    assert histories[0] == histories[1], "tp ranks report the same loss"
    assert last < 0.5 * first, (first, last)


MOE = ("--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 "
       "--moe-ffn-hidden-size 32 --moe-layer-freq 1,0,1,0")


@pytest.mark.parametrize("name, world, extra", [
    ("ep2_allgather", 2, "--expert-model-parallel-size 2"),
    ("ep2_alltoall_tp2_sp", 4, "--expert-model-parallel-size 2 --moe-token-dispatcher-type "
                               "alltoall --tensor-model-parallel-size 2 --sequence-parallel"),
    # FSDP2: experts on a one-rank expert-dp mesh, divided by dp like DDP's.
    ("ep2_fsdp2", 2, "--expert-model-parallel-size 2 --use-torch-fsdp2"),
])
def test_moe_layouts_equal_single_rank(tmp_path, name, world, extra):
    """A GPT with MoE on layers 1 and 3: expert parallelism reproduces the ep=1 losses."""
    ref_losses, _ = _train(tmp_path, "moe_ref", 1, MOE)
    losses, _ = _train(tmp_path, name, world, f"{MOE} {extra}")
    assert ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    records = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
    assert any(k.startswith("moe") for k in records[0]), sorted(records[0])


# Attention dropout compares across layouts with the opt-in keyed mask (the default
# in-kernel mask differs between tp layouts and agrees only statistically).
DROPOUT = "--hidden-dropout 0.2 --attention-dropout 0.2 --layout-independent-attention-dropout"


@pytest.fixture(scope="module")
def reference_with_dropout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref_dropout")
    with_dropout, _ = _train(tmp, "ref", 1, DROPOUT)
    without, _ = _train(tmp, "plain", 1, "")
    assert with_dropout != without, "dropout must be active"
    return with_dropout


@pytest.mark.parametrize("name, world, extra", [
    ("pp2", 2, "--pipeline-model-parallel-size 2"),
    ("pp2_vpp2", 2, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1"),
    ("tp2_pp2_sp", 4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                      "--sequence-parallel"),
])
def test_dropout_masks_do_not_depend_on_the_layout(reference_with_dropout, tmp_path, name, world,
                                                   extra):
    """Each layer draws its masks from its own keyed stream, so pipeline stages and the
    schedule's interleaving of micro-batches do not change them."""
    ref_losses = reference_with_dropout
    losses, _ = _train(tmp_path, name, world, f"{DROPOUT} {extra}")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)


def test_context_parallel_dropout_matches_single_rank(reference_with_dropout, tmp_path):
    """Ring attention and DotProductAttention draw the same keyed attention-dropout mask
    from the layer's stream, and hidden dropout keeps the rank's global positions: cp=2
    alone, with pp=2 and with tp=2 reproduce the single rank with dropout on."""
    for name, world, extra in [("cp2", 2, "--context-parallel-size 2"),
                               ("cp2_pp2", 4, "--context-parallel-size 2 "
                                              "--pipeline-model-parallel-size 2"),
                               ("cp2_tp2", 4, "--context-parallel-size 2 "
                                              "--tensor-model-parallel-size 2")]:
        losses, _ = _train(tmp_path, name, world, f"{DROPOUT} {extra}")
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_with_dropout),
                                   rtol=1e-5, atol=0, msg=lambda m: f"{name}: {m}")


# ZBV (two chunks per rank in a V, loss on rank 0): the word embedding and the output
# layer are different chunks of rank 0, so ZBV runs untied; compared with an untied
# single-rank run of the same model.
ZBV_LAYOUTS = [
    ("pp2_zbv", 2, 4, "--pipeline-model-parallel-size 2 --pipeline-schedule zbv"),
    ("pp4_zbv", 4, 8, "--pipeline-model-parallel-size 4 --pipeline-schedule zbv "
                      "--num-virtual-stages-per-pipeline-rank 2"),
    ("tp2_pp2_zbv", 4, 4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                          "--sequence-parallel --pipeline-schedule zbv "
                          "--use-distributed-optimizer"),
]


@pytest.mark.parametrize("name, world, layers, extra", ZBV_LAYOUTS,
                         ids=[l[0] for l in ZBV_LAYOUTS])
def test_zbv_losses_and_grad_norms_equal_single_rank(tmp_path, name, world, layers, extra):
    # Validation at iteration 5 runs ZBV's forward-only plan; its loss reaches the logger.
    untied = (f"--untie-embeddings-and-output-weights --num-layers {layers} --eval-iters 1 "
              "--eval-interval 5")
    ref_losses, ref_norms = _train(tmp_path, "ref", 1, untied)
    losses, norms = _train(tmp_path, name, world, f"{untied} {extra}")
    assert len(losses) == len(ref_losses) == 5
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=0)
    validation = [_validation(tmp_path / f"{run}.jsonl") for run in ("ref", name)]
    assert len(validation[0]) == 1
    torch.testing.assert_close(torch.tensor(validation[1]), torch.tensor(validation[0]),
                               rtol=1e-5, atol=0)


def _validation(path):
    with open(path) as f:
        return [r["validation_lm_loss"] for r in map(json.loads, f) if "validation_lm_loss" in r]
