"""Megatron's distributed-optimizer state, against megatron-core 0.16.1 itself.

megatron-core's own ``DistributedDataParallel`` and ``DistributedOptimizer``
(``--use-distributed-optimizer``) train the Llama-style model at tp 1 x dp 2 (each dp
rank holds part of every bucket's main params and moments) or tp 2 x dp 1 on gloo for
two iterations, save
with ``dist_checkpointing.save`` in the distributed optimizer's sharding types and in
the legacy format (rank files and ``distrib_optim.pt``), and go on for two more
iterations: the uninterrupted run.

* ``dp_reshardable`` (Megatron-LM's default: the flat DDP buckets, one and several),
  ``fully_reshardable`` (``--dist-ckpt-optim-fully-reshardable``) and the legacy
  ``distrib_optim.pt`` (one bucket; several are refused: the file lacks their sizes):
  megacore loads each directly (``load_megatron_checkpoint``, what ``pretrain_gpt.py
  --load`` calls): each rank's shard of every main param and Adam moment, as megatron-core's optimizer
  holds it (its ``_get_main_param_and_optimizer_states``), equals the same slice of
  megacore's, bitwise; the step too; iterations 2-3 give megatron's losses and grad norms.
  Converted to megacore (torch_dist) the state is carried: the same moments and losses.
  ``pretrain_gpt.py --load`` continues from it exactly as from its conversion.
* ``dp_zero_gather_scatter`` (deprecated, pickled objects): a note naming the sharding
  type when converting, an error naming it and ``common.pt`` when training.

Tolerances: dp 2 with the same batch on both ranks averages two equal grads (exact in
fp32), so megacore's single-optimizer continuation differs from megatron-core's only by
op order: rtol 1e-5 as in the layout tests.
"""

import pytest
import torch

from megacore.checkpointing.conversion import convert_checkpoint
from megacore.checkpointing.conversion.manifest import ConversionError
from megacore.checkpointing.conversion.megatron_dp_buckets import bucket_ranges, dp_bucket_keys
from megacore.checkpointing.conversion.megatron_optimizer import UnsupportedOptimizerState
from tests.multirank import run_distributed

pytest.importorskip("megatron.core")

from tests.checkpointing.conversion import megatron_reference as mr  # noqa: E402
from tests.checkpointing.conversion.test_megatron_optimizer import (  # noqa: E402
    _megacore_bf16_load, _megacore_resume, _pretrain_losses)

RTOL = dict(rtol=1e-5, atol=1e-6)
SHARDING_TYPES = ("fully_reshardable", "dp_reshardable")
LEGACY = "legacy"  # the legacy format: rank files and distrib_optim.pt
SEVERAL_BUCKETS = 4000  # elements (--overlap-grad-reduce --ddp-bucket-size): 5 buckets
REFUSED = "dp_zero_gather_scatter"  # deprecated; one pickled object per model-parallel rank


def _megatron_distopt_train(root, tp, bucket_size, kind="llama"):
    """Rank body (tp x dp = 2): iterations 0-1, a save per sharding type, 2-3."""
    mr.stub_for_cpu()
    mr.init_parallel(tp=tp)
    model = mr.build_model(kind, tp=tp).train()
    ddp, optimizer, scheduler = mr.megatron_distributed_optimizer(model, bucket_size)
    buckets = [b.numel_unpadded for b in ddp.buffers[0].buckets]  # one buffer
    losses = [mr.ddp_train_step(ddp, optimizer, scheduler, step) for step in (0, 1)]
    shards = mr.distributed_adam_state_by_name(model, optimizer)
    for sharding in SHARDING_TYPES + (REFUSED,):
        # Megatron-LM saves the unwrapped model's sharded state dict (no DDP prefix).
        mr.save_torch_dist(f"{root}/{sharding}", kind, model, tp, 1, 1,
                           optimizer=optimizer, scheduler=scheduler,
                           metadata={"distrib_optim_sharding_type": sharding})
    mr.save_legacy_distributed(f"{root}/{LEGACY}", kind, model, optimizer, scheduler, tp)
    losses += [mr.ddp_train_step(ddp, optimizer, scheduler, step) for step in (2, 3)]
    return {"losses": losses, "shards": shards, "buckets": buckets}


def _assert_shards_equal(shards, megacore_params):
    """megatron-core's dp shards (by its param names) equal the same slices of megacore's
    whole tensors (``0/<name>``)."""
    assert shards
    for name, shard in shards.items():
        mine = megacore_params[f"0/{name}"]
        start, end = shard["range"]
        for field in ("main_param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(mine[field].float().flatten()[start:end], shard[field]), \
                (name, field)
        assert torch.equal(mine["step"].float(), shard["step"].float()), name


def _assert_shards_cover(ref, megacore_params, tp):
    """The ranks' shards together cover every param once; at dp 2 each rank holds only
    part of the params: the state really was sharded."""
    covered = {}
    for rank in (0, 1):
        for name, shard in ref[rank]["shards"].items():
            covered.setdefault(name, []).append(shard["range"][1] - shard["range"][0])
    assert sorted(f"0/{n}" for n in covered) == sorted(megacore_params)
    for name, sizes in covered.items():
        assert sum(sizes) == megacore_params[f"0/{name}"]["exp_avg"].numel() * tp, name
    if tp == 1:
        assert all(0 < len(ref[rank]["shards"]) < len(covered) for rank in (0, 1))


@pytest.mark.parametrize("tp,bucket_size", [(1, None), (1, SEVERAL_BUCKETS), (2, None)])
def test_megatron_distributed_optimizer_state_resumes_exactly(tmp_path, tp, bucket_size):
    """tp 1 x dp 2 (the state sharded over dp), with one bucket and with several, and
    tp 2 x dp 1 (the buckets hold tp shards: merged like the weights, fused QKV and
    SwiGLU included).

    ``fully_reshardable`` is checked with one bucket only: megatron-core 0.16.1 itself
    mislabels it with several (``get_parameter_state_dp_zero`` drops the padding between
    buckets from the gathered buffer, ``sharded_param_state_fully_reshardable`` slices it
    with the padded offsets), so its tensors are not the params' state there."""
    root = str(tmp_path)
    ref = run_distributed(_megatron_distopt_train, world_size=2,
                          args=(root, tp, bucket_size), timeout=300)
    assert (len(ref[0]["buckets"]) > 2) == (bucket_size is not None)
    for sharding in SHARDING_TYPES[bool(bucket_size):] + (LEGACY,):
        saved = f"{root}/{sharding}"
        direct = run_distributed(_megacore_resume, world_size=2, args=(saved, tp),
                                 timeout=240)
        _assert_shards_cover(ref, direct[0]["params"], tp)
        converted_dir = f"{root}/mc_{sharding}"
        report = convert_checkpoint(load_dir=saved, save_dir=converted_dir,
                                    ckpt_format="torch_dist", target_tensor_parallel_size=1,
                                    progress=False)
        assert not any("optimizer" in note for note in report.notes)
        runs = [direct]
        if tp == 1:  # the converted checkpoint is at tp 1
            runs.append(run_distributed(_megacore_resume, world_size=2,
                                        args=(converted_dir, 1), timeout=240))
        for run in runs:
            assert run[0]["num_steps"] == 2
            for rank in (0, 1):
                _assert_shards_equal(ref[rank]["shards"], run[rank]["params"])
                torch.testing.assert_close(run[rank]["losses"], ref[rank]["losses"][2:],
                                           **RTOL)
    fresh = run_distributed(_megacore_resume, world_size=2,
                            args=(f"{root}/dp_reshardable", tp, True), timeout=240)
    assert fresh[0]["losses"][1][0] != pytest.approx(ref[0]["losses"][3][0], rel=1e-3)


def test_unaligned_buckets_read_from_torch_dist_refused_from_legacy(tmp_path, monkeypatch):
    """GPT-2 style (32-element biases) with 2200-element buckets: some buckets end off
    the 64-element grid, and ``distrib_optim.pt`` records no bucket sizes, so its offsets
    are unknown: a note when converting, not a misread state."""
    root = str(tmp_path)
    ref = run_distributed(_megatron_distopt_train, world_size=2,
                          args=(root, 1, 2200, "gpt2"), timeout=300)
    assert any(size % 64 for size in ref[0]["buckets"])
    report = convert_checkpoint(load_dir=f"{root}/{LEGACY}", save_dir=f"{root}/x",
                                progress=False)
    assert any("mp_rank_00/model_optim_rng.pt: distrib_optim.pt does not match the model "
               "as one bucket" in note and "several DDP buckets" in note
               for note in report.notes), report.notes
    # The torch_dist form records the bucket sizes: read exactly.
    direct = run_distributed(_megacore_resume, world_size=2,
                             args=(f"{root}/dp_reshardable", 1), timeout=240)
    for rank in (0, 1):
        _assert_shards_equal(ref[rank]["shards"], direct[rank]["params"])
        torch.testing.assert_close(direct[rank]["losses"], ref[rank]["losses"][2:], **RTOL)
    # A param order differing from megatron-core's (two same-size params swapped: the
    # same offsets) is caught by the main params not matching the weights.
    from megacore.checkpointing.conversion import megatron_format

    def swapped(order, original=megatron_format.megatron_module_order):
        items = list(original(order).items())
        i = next(i for i, (k, _) in enumerate(items) if k.endswith("input_layernorm.weight"))
        items[i], items[i + 1] = items[i + 1], items[i]
        assert items[i][0].endswith("input_layernorm.bias")
        return dict(items)

    monkeypatch.setattr(megatron_format, "megatron_module_order", swapped)
    with pytest.raises(ConversionError, match="main param of .* does not match the weight"):
        convert_checkpoint(load_dir=f"{root}/dp_reshardable", save_dir=f"{root}/z",
                           progress=False)


def test_pretrain_resumes_megatron_distributed_optimizer(tmp_path):
    """``pretrain_gpt.py --load`` of Megatron-LM's default (``dp_reshardable``)
    checkpoint continues as from its megacore conversion; a sharding type megacore does
    not read is a note when converting and an error when training, naming the type."""
    root = str(tmp_path)
    run_distributed(_megatron_distopt_train, world_size=2, args=(root, 1, None),
                    timeout=300)
    saved = f"{root}/dp_reshardable"
    convert_checkpoint(load_dir=saved, save_dir=f"{root}/mc", ckpt_format="torch_dist",
                       target_tensor_parallel_size=1, progress=False)
    direct = _pretrain_losses(tmp_path, "direct", saved)
    assert [i for i, _ in direct] == [8, 9]
    assert direct == _pretrain_losses(tmp_path, "converted", f"{root}/mc")
    report = convert_checkpoint(load_dir=f"{root}/{REFUSED}", save_dir=f"{root}/y",
                                progress=False)
    assert any(f"sharding type '{REFUSED}'" in note for note in report.notes)
    with pytest.raises(AssertionError, match=r"common.pt: saved by Megatron's distributed "
                                             rf"optimizer with sharding type '{REFUSED}'"):
        _pretrain_losses(tmp_path, "refused", f"{root}/{REFUSED}")


def test_bucket_ranges_worked_example_and_errors():
    """The module docstring's example; params that do not fill the buckets exactly."""
    params = [("a", 100), ("b", 30), ("c", 64)]
    assert bucket_ranges(params, [228], "ckpt") == {"c": (0, 0, 64), "b": (0, 64, 94),
                                                    "a": (0, 128, 228)}
    assert bucket_ranges(params, [94, 100], "ckpt") == {"c": (0, 0, 64), "b": (0, 64, 94),
                                                        "a": (1, 0, 100)}
    with pytest.raises(ConversionError, match="ckpt: param a overruns"):
        bucket_ranges(params, [94, 99], "ckpt")
    with pytest.raises(ConversionError, match="ckpt: the params fill 1 of the"):
        bucket_ranges(params, [228, 64], "ckpt")
    with pytest.raises(ConversionError, match="buckets end before param a"):
        bucket_ranges(params, [94], "ckpt")


def test_dp_bucket_keys_refuse_other_buffers():
    prefix = "optimizer.distributed.dp_group_idx_0.gbuf_idx_{}.dtype_(torch.float32, " \
        "torch.float32).bucket_idx_0"
    keys = [f"{prefix.format(0)}.{f}" for f in ("param", "exp_avg", "exp_avg_sq")]
    assert dp_bucket_keys(keys, 1, "ckpt") == {0: [prefix.format(0)]}
    with pytest.raises(UnsupportedOptimizerState, match="gbuf_idx_1.* single grad buffer"):
        dp_bucket_keys(keys + [f"{prefix.format(1)}.param"], 1, "ckpt")
    with pytest.raises(ConversionError, match="missing: .*exp_avg_sq"):
        dp_bucket_keys(keys[:2], 1, "ckpt")
    with pytest.raises(ConversionError, match="model-parallel rank 1 are missing"):
        dp_bucket_keys(keys, 2, "ckpt")


def _megatron_bf16_distopt_train(root):
    """Rank body (dp 2): a bf16 model with the distributed optimizer, two iterations,
    the default torch_dist save and the legacy one."""
    mr.stub_for_cpu()
    mr.init_parallel()
    model = mr.build_model("llama").train().bfloat16()  # what Float16Module does
    ddp, optimizer, scheduler = mr.megatron_distributed_optimizer(model, bf16=True)
    for step in (0, 1):
        mr.ddp_train_step(ddp, optimizer, scheduler, step)
    mr.save_torch_dist(f"{root}/dp_reshardable", "llama", model, 1, 1, 1,
                       optimizer=optimizer, scheduler=scheduler,
                       metadata={"distrib_optim_sharding_type": "dp_reshardable"},
                       bf16=True)
    mr.save_legacy_distributed(f"{root}/{LEGACY}", "llama", model, optimizer, scheduler, 1,
                               bf16=True)
    return mr.distributed_adam_state_by_name(model, optimizer)


def test_megatron_bf16_distributed_optimizer_state(tmp_path):
    """bf16 weights, fp32 main params and moments in the buckets: megacore's
    mixed-precision optimizer loads each dp rank's shard bitwise (torch_dist and legacy)."""
    root = str(tmp_path)
    ref = run_distributed(_megatron_bf16_distopt_train, world_size=2, args=(root,),
                          timeout=300)
    for form in ("dp_reshardable", LEGACY):
        loaded = run_distributed(_megacore_bf16_load, world_size=1, args=(f"{root}/{form}",),
                                 timeout=240)[0]
        assert loaded["0/decoder.final_layernorm.weight"]["main_param"].dtype == torch.float32
        for rank in (0, 1):
            _assert_shards_equal(ref[rank], loaded)
