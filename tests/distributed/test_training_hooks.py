"""``build_training_hooks``: the schedules' hooks for DDP and FSDP2 chunks.

The mapping is checked on real wrappers (which hook each kind of chunk gets), and a
training run through ``forward_backward_no_pipelining`` with the built hooks (DDP no_sync,
overlapped grad reduction, the distributed optimizer's parameter all-gather dispatched by
the schedule under ``align_param_gather``, loss scaling, finalization) equals the
single-process reference of ``toy_training``. Tolerance as in
``test_distributed_data_parallel.py``: rtol 1e-5 / atol 1e-6 (fp32, dp sums reassociated).
FSDP2's no-sync is checked numerically in ``test_fully_shard.py``.
"""

import pytest
import torch
import torch.nn.functional as F

from megacore import parallel_state
from megacore.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    build_training_hooks,
    fully_shard_model,
    fully_sharded_no_sync,
)
from megacore.model_parallel_config import ModelParallelConfig
from megacore.optimizer import OptimizerConfig, get_megatron_optimizer
from megacore.pipeline_parallel.schedules import forward_backward_no_pipelining
from tests.distributed.toy_training import (
    CLIP, LR, WEIGHT_DECAY, RefModel, full_params, local_batch, make_batches, make_master,
    no_decay, reference_run)
from tests.multirank import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)
MICROBATCHES = 2


class _Stage(RefModel):
    """The toy MLP as a one-stage pipeline model (the schedules set its input)."""

    def set_input_tensor(self, tensor):
        assert tensor is None


def _ddp(master, **ddp_options):
    config = ModelParallelConfig()
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, bucket_size=40,
                                               **ddp_options)
    return DistributedDataParallel(config, ddp_config, _Stage(master))


def _forward_step(data_iterator, model):
    x, y = next(data_iterator)
    output = model(x)
    return output, lambda out: (F.mse_loss(out, y), {"loss": F.mse_loss(out, y).detach()})


def _train(master, batches, ddp_options):
    parallel_state.initialize_model_parallel()
    model = _ddp(master, **ddp_options)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY, clip_grad=CLIP,
                        use_distributed_optimizer=ddp_options["use_distributed_optimizer"]),
        [model], no_weight_decay_cond=lambda name, p: no_decay(name.removeprefix("module.")))
    hooks = build_training_hooks(model, optimizer)
    aligned = hooks.param_sync_func == model.start_param_sync
    norms = []
    for x, y in batches:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        xl, yl = local_batch(x, y)
        micro = list(zip(xl.chunk(MICROBATCHES), yl.chunk(MICROBATCHES)))
        forward_backward_no_pipelining(forward_step_func=_forward_step,
                                       data_iterator=iter(micro), model=model,
                                       num_microbatches=MICROBATCHES, hooks=hooks)
        ok, norm, _ = optimizer.step()
        assert ok
        norms.append(float(norm))
    params = full_params(model)
    parallel_state.destroy_model_parallel()
    return params, norms, aligned, hooks.grad_sync_func == model.start_grad_sync


OPTIONS = [dict(use_distributed_optimizer=False),
           dict(use_distributed_optimizer=True, overlap_grad_reduce=True,
                overlap_param_gather=True),
           dict(use_distributed_optimizer=True, overlap_grad_reduce=True,
                overlap_param_gather=True, align_param_gather=True)]


@pytest.mark.parametrize("ddp_options", OPTIONS, ids=["ddp", "distopt_overlap", "aligned"])
def test_ddp_hooks_train_like_one_process(ddp_options):
    master, batches = make_master(), make_batches(3)
    ref_params, ref_norms = reference_run(master, batches)
    for params, norms, aligned, overlapped in run_distributed(
            _train, 2, args=(master, batches, ddp_options), timeout=120):
        assert aligned == ddp_options.get("align_param_gather", False)
        assert overlapped == ddp_options.get("overlap_grad_reduce", False)
        for name, value in ref_params.items():
            torch.testing.assert_close(params[name], value, **TOL, msg=name)
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), **TOL)


def _wrappers(master):
    parallel_state.initialize_model_parallel()
    chunks = [_ddp(master), _ddp(master)]
    hooks = build_training_hooks(chunks)
    out = {"ddp_no_sync": [f == c.no_sync for f, c in zip(hooks.no_sync_func, chunks)],
           "ddp_unset": (hooks.grad_sync_func, hooks.param_sync_func, hooks.grad_scale_func)}
    sharded = fully_shard_model(_Stage(master))
    hooks = build_training_hooks(sharded)
    out["fsdp_no_sync"] = (hooks.no_sync_func.func is fully_sharded_no_sync
                           and hooks.no_sync_func.args == (sharded,))
    out["fsdp_unset"] = (hooks.grad_sync_func, hooks.param_sync_func)
    errors = []
    for bad in ([sharded, chunks[0]], _Stage(master)):
        try:
            build_training_hooks(bad)
        except TypeError as error:
            errors.append(str(error))
    try:
        with fully_sharded_no_sync(chunks[0]):
            pass
    except TypeError as error:
        errors.append(str(error))
    parallel_state.destroy_model_parallel()
    return out, errors


def test_hooks_follow_the_wrapping_and_unknown_wrappers_are_refused():
    out, errors = run_distributed(_wrappers, 2, args=(make_master(),), timeout=120)[0]
    assert out["ddp_no_sync"] == [True, True]
    assert out["ddp_unset"] == (None, None, None)
    assert out["fsdp_no_sync"] and out["fsdp_unset"] == (None, None)
    assert len(errors) == 3
    assert "mix FSDP2" in errors[0]
    assert "needs DistributedDataParallel or fully_shard_model chunks, got _Stage" in errors[1]
    assert "needs a fully_shard_model chunk, got DistributedDataParallel" in errors[2]
