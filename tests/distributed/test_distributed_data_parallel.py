"""Buffer layout (pure logic) and DDP behaviour on gloo ranks: buckets, hooks that start
the reduction during backward, no_sync accumulation, lazy param all-gather, errors,
broadcast_params and gradient-accumulation fusion.

Grad comparisons use rtol/atol 1e-6: the only difference from the reference is the
order of a handful of fp32 additions.
"""

import pytest
import torch
import torch.nn.functional as F

from megacore import parallel_state
from megacore.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    compute_buffer_layout,
    shard_range,
)
from megacore.model_parallel_config import ModelParallelConfig
from tests.distributed.toy_training import (
    Case,
    RefModel,
    TPModel,
    build,
    local_batch,
    make_batches,
    make_master,
    train_step,
)
from tests.multirank import run_distributed

TOL = dict(rtol=1e-6, atol=1e-6)


def test_layout_worked_example_from_docstring():
    # params a[6], b[4], c[10] placed in reverse order, dp=2, distributed optimizer.
    layout = compute_buffer_layout([10, 4, 6], bucket_size=12, data_parallel_size=2,
                                   pad_for_sharding=True)
    assert layout.param_ranges == [(0, 10), (10, 14), (256, 262)]
    assert [(s, e) for s, e, _ in layout.buckets] == [(0, 256), (256, 512)]
    assert layout.numel == 512
    assert shard_range(256, 2, 1) == (128, 256)


def test_layout_without_sharding_is_dense_and_own_bucket_splits():
    layout = compute_buffer_layout([3, 5, 7, 2], bucket_size=None, data_parallel_size=4,
                                   pad_for_sharding=False, own_bucket=[False, True, False, False])
    assert layout.param_ranges == [(0, 3), (3, 8), (8, 15), (15, 17)]
    assert [m for _, _, m in layout.buckets] == [[0], [1], [2, 3]]
    assert layout.numel == 17


def _grads_of(module, x, y):
    module.zero_grad()
    F.mse_loss(module(x), y).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _ddp_behaviours(master, batches):
    parallel_state.initialize_model_parallel()
    config = ModelParallelConfig()
    (x0, y0), (x1, y1) = batches[0], batches[1]
    ref = RefModel(master)
    out = {}

    # Hooks start every bucket's reduction during backward; several buckets exist.
    ddp_cfg = DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=40)
    model = DistributedDataParallel(config, ddp_cfg, RefModel(master))
    out["num_buckets"] = len(model.buffers[0].buckets)
    model.zero_grad_buffer()
    F.mse_loss(model(local_batch(x0, y0)[0]), local_batch(x0, y0)[1]).backward()
    out["in_flight_after_backward"] = all(b.grad_reduce_handle is not None
                                          for b in model.buffers[0].buckets)
    out["grad_is_none"] = all(p.grad is None for p in model.parameters())
    model.finish_grad_sync()
    expected = _grads_of(ref, x0, y0)
    for name, p in model.module.named_parameters():
        torch.testing.assert_close(p.main_grad, expected[name], **TOL)

    # no_sync: the first micro-batch accumulates locally, the second triggers the reduction.
    model.zero_grad_buffer()
    with model.no_sync():
        F.mse_loss(model(local_batch(x0, y0)[0]), local_batch(x0, y0)[1]).backward()
    out["nothing_in_flight_inside_no_sync"] = all(b.grad_reduce_handle is None
                                                  for b in model.buffers[0].buckets)
    F.mse_loss(model(local_batch(x1, y1)[0]), local_batch(x1, y1)[1]).backward()
    model.finish_grad_sync()
    expected1 = _grads_of(ref, x1, y1)
    for name, p in model.module.named_parameters():
        torch.testing.assert_close(p.main_grad, expected[name] + expected1[name], **TOL)

    # A param without a grad stalls its bucket: finish_grad_sync says so instead of hanging.
    model.zero_grad_buffer()
    model.module.norm(local_batch(x0, y0)[0][:, :8]).sum().backward()
    try:
        model.finish_grad_sync()
        out["unused_param_error"] = None
    except RuntimeError as err:
        out["unused_param_error"] = str(err)
    return out


def test_ddp_hooks_no_sync_and_unused_params():
    master, batches = make_master(), make_batches(2)
    results = run_distributed(_ddp_behaviours, 2, args=(master, batches))
    for r in results:
        assert r["num_buckets"] > 1
        assert r["in_flight_after_backward"]
        assert r["grad_is_none"]
        assert r["nothing_in_flight_inside_no_sync"]
        assert r["unused_param_error"] and "never started" in r["unused_param_error"]


def _param_gather_and_broadcast(master, batches):
    parallel_state.initialize_model_parallel()
    out = {}
    case = Case(use_distributed_optimizer=True, overlap_grad_reduce=True,
                overlap_param_gather=True, bucket_size=40)
    model, optimizer = build(master, case)
    x, y = batches[0]
    train_step(model, optimizer, x, y)
    buckets = model.buffers[0].buckets
    out["lazy_after_step"] = not any(b.param_gather_dispatched for b in buckets)
    model(local_batch(x, y)[0])
    out["gathered_after_forward"] = all(b.param_gather_dispatched for b in buckets)
    out["params_after_forward"] = {n: p.detach().clone()
                                   for n, p in model.module.named_parameters()}

    # broadcast_params: ranks start different, end equal to dp rank 0.
    torch.manual_seed(100 + torch.distributed.get_rank())
    other = {k: torch.randn_like(v) for k, v in master.items()}
    model2 = DistributedDataParallel(ModelParallelConfig(), DistributedDataParallelConfig(),
                                     RefModel(other))
    model2.broadcast_params()
    out["broadcast"] = {n: p.detach().clone() for n, p in model2.module.named_parameters()}
    return out


def test_overlap_param_gather_is_lazy_and_broadcast_params():
    master, batches = make_master(), make_batches(1)
    r0, r1 = run_distributed(_param_gather_and_broadcast, 2, args=(master, batches))
    for r in (r0, r1):
        assert r["lazy_after_step"] and r["gathered_after_forward"]
    for name in r0["params_after_forward"]:
        # An all-gather copies bits: ranks agree exactly.
        torch.testing.assert_close(r0["params_after_forward"][name],
                                   r1["params_after_forward"][name], rtol=0, atol=0)
        torch.testing.assert_close(r0["broadcast"][name], r1["broadcast"][name], rtol=0, atol=0)
    assert not torch.equal(r0["params_after_forward"]["fc1.weight"], master["fc1.weight"])


def _fused_wgrad(master, batches):
    parallel_state.initialize_model_parallel()
    config = ModelParallelConfig(gradient_accumulation_fusion=True)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                    TPModel(master, config))
    x, y = batches[0]
    model.zero_grad_buffer()
    F.mse_loss(model(local_batch(x, y)[0]), local_batch(x, y)[1]).backward()
    flagged = bool(model.module.fc1.weight.grad_added_to_main_grad)
    model.finish_grad_sync()
    return flagged, {n: p.main_grad.clone() for n, p in model.module.named_parameters()}


def test_gradient_accumulation_fusion_is_not_counted_twice():
    master, batches = make_master(), make_batches(1)
    expected = _grads_of(RefModel(master), *batches[0])
    for flagged, grads in run_distributed(_fused_wgrad, 2, args=(master, batches)):
        assert flagged  # the fused path was taken
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], **TOL)


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        DistributedDataParallelConfig(overlap_param_gather=True)
    with pytest.raises(ValueError, match="bucket_size"):
        DistributedDataParallelConfig(bucket_size=0)


def _one_rank_groups(master, batches, use_distributed_optimizer):
    """ep=2 on 2 ranks: dense params reduce over dp=2, the expert-marked fc2 over an
    expert-data-parallel group of one rank. Both schedule patterns: every micro-batch in
    no_sync then ``start_grad_sync`` (pipeline schedules, ``grad_sync_func``), and the
    last micro-batch's hooks starting the buckets (followed by a redundant
    ``start_grad_sync``, which must not scale twice)."""
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    model = RefModel(master)
    for p in model.fc2.parameters():
        p.allreduce = False
    ddp_cfg = DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=40,
                                            use_distributed_optimizer=use_distributed_optimizer)
    ddp = DistributedDataParallel(ModelParallelConfig(), ddp_cfg, model)
    assert torch.distributed.get_world_size(ddp.expert_dp_group) == 1
    (x0, y0), (x1, y1) = batches[0], batches[1]
    out = {}
    for pattern in ("all_in_no_sync", "hooks_then_start"):
        ddp.zero_grad_buffer()
        with ddp.no_sync():
            F.mse_loss(ddp(local_batch(x0, y0)[0]), local_batch(x0, y0)[1]).backward()
            if pattern == "all_in_no_sync":
                F.mse_loss(ddp(local_batch(x1, y1)[0]), local_batch(x1, y1)[1]).backward()
        if pattern == "hooks_then_start":
            F.mse_loss(ddp(local_batch(x1, y1)[0]), local_batch(x1, y1)[1]).backward()
        ddp.start_grad_sync()
        ddp.finish_grad_sync()
        out[pattern] = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    # Local (this rank's half of the batch) grads, for the expert params that are not reduced.
    local = RefModel(master)
    xa, ya = local_batch(x0, y0)
    xb, yb = local_batch(x1, y1)
    (F.mse_loss(local(xa), ya) + F.mse_loss(local(xb), yb)).backward()
    out["local"] = {n: p.grad.clone() for n, p in local.named_parameters()}
    return out


@pytest.mark.parametrize("use_distributed_optimizer", [False, True], ids=["ddp", "distopt"])
def test_overlap_grad_reduce_with_one_rank_groups(use_distributed_optimizer):
    """A one-rank (expert) data-parallel group needs no collective, but its buckets must
    still be started, finished and scaled exactly once."""
    master, batches = make_master(), make_batches(2)
    expected = _grads_of(RefModel(master), *batches[0])
    expected1 = _grads_of(RefModel(master), *batches[1])
    results = run_distributed(_one_rank_groups, 2, args=(master, batches,
                                                         use_distributed_optimizer))
    for r in results:
        for pattern in ("all_in_no_sync", "hooks_then_start"):
            grads = r[pattern]
            for name, grad in grads.items():
                if name.startswith("fc2"):
                    # expert grads: this rank's tokens only, divided by dp x cp = 2, once.
                    torch.testing.assert_close(grad, r["local"][name] / 2, **TOL)
                elif not use_distributed_optimizer:
                    torch.testing.assert_close(grad, expected[name] + expected1[name], **TOL)
