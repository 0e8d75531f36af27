"""``pretrain``: the training loop behind ``examples/pretrain_gpt.py``.

Megatron users know its shape: providers for datasets and the model, a forward-step
function, and flags. The differences are that nothing is global (the parsed flags are a
:class:`~megacore.training.arguments.RunConfig` passed to the providers) and that every
inconsistency is rejected before any training starts.

Flow: initialize (process groups, seeds) -> build model chunks (one per virtual
pipeline stage) wrapped in DDP -> optimizer and lr schedule -> load a checkpoint ->
datasets and iterators that resume at the consumed-samples count -> train (schedule,
optimizer step, logging, evaluation, saving, exit conditions) -> final save and test.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megacore import checkpointing, device, parallel_state
from megacore.checkpointing.async_save import reset_async_state
from megacore.checkpointing.conversion.megatron_load import (
    is_megatron_checkpoint,
    load_megatron_checkpoint,
    megatron_run_config,
)
from megacore.checkpointing.conversion.tokenizer_files import resolve_checkpoint_paths
from megacore.checkpointing.paths import detect_format
from megacore.distributed import (
    DistributedDataParallel,
    NonFiniteGradientError,
    build_training_hooks,
    fully_shard_model,
    is_fully_sharded,
)
from megacore.optimizer import (
    GradStatsContext,
    OptimizerParamScheduler,
    get_megatron_optimizer,
    local_grad_norm_squared,
)
from megacore.pipeline_parallel import get_forward_backward_func
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.training.arguments import (
    RunConfig,
    parse_step_batch_size_schedule,
    read_flag_values,
    run_config_from_flags,
    run_config_to_dict,
)
from megacore.training.data_samplers import build_pretraining_data_loader, cyclic_iter
from megacore.training.flops import num_floating_point_operations
from megacore.training.metrics_logger import MetricsLogger
from megacore.training.num_microbatches_calculator import NumMicroBatchesCalculator
from megacore.training.run_summary import run_summary, write_resolved_config
from megacore.transformer.moe import (
    reduce_moe_metrics,
    reset_moe_metrics,
    set_moe_aux_loss_scale,
    update_router_expert_bias,
)

__all__ = ["pretrain", "initialize_distributed", "initialize_model_parallel_from_run",
           "saved_run_config", "checkpoint_is_missing", "load_any_checkpoint", "params_norm",
           "get_model", "get_optimizer_param_scheduler", "train_step", "evaluate",
           "TrainState", "print_rank_0", "print_rank_last"]

# Peak dense bf16 TFLOP/s per device, for MFU; devices not listed get no MFU figure.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclasses.dataclass
class TrainState:
    """Progress of a run: what a checkpoint must restore to continue exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    pending_async_save: Optional[int] = None
    """Iteration of an asynchronous save not yet finalized (not saved in checkpoints)."""


def print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def print_rank_last(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
        print(message, flush=True)


# -- initialization ---------------------------------------------------------------------
def initialize_distributed(backend: Optional[str] = None, timeout_minutes: float = 10) -> bool:
    """Join the process group started by torchrun (or a one-rank group without it).

    Returns True when this call created the process group (the caller then owns it and
    destroys it at the end), False when one already existed.
    """
    if dist.is_initialized():
        return False
    backend = backend or device.default_backend()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            device.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
        return True
    # A plain `python pretrain_gpt.py` run: a world of one, rendezvous through a file.
    store = tempfile.NamedTemporaryFile(prefix="megacore-rdzv-", delete=False)
    store.close()
    os.unlink(store.name)
    dist.init_process_group(backend, init_method=f"file://{store.name}", rank=0,
                            world_size=1, timeout=timeout)
    return True


def initialize_model_parallel_from_run(run: RunConfig) -> None:
    m = run.model
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=m.tensor_model_parallel_size,
        pipeline_model_parallel_size=m.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=m.virtual_pipeline_model_parallel_size,
        context_parallel_size=m.context_parallel_size,
        expert_model_parallel_size=m.expert_model_parallel_size,
        expert_tensor_parallel_size=m.expert_tensor_parallel_size,
        distributed_timeout_minutes=run.training.distributed_timeout_minutes)
    parallel_state.set_virtual_pipeline_v_shape(m.pipeline_schedule == "zbv")
    # One seed everywhere: megacore initializes weights independently of the layout, and
    # the tracker derives the per-tp-rank streams itself.
    model_parallel_manual_seed(run.training.seed)
    if m.deterministic_mode:
        torch.use_deterministic_algorithms(True)


def get_model(model_provider: Callable, run: RunConfig, wrap_with_ddp: bool = True
              ) -> List[torch.nn.Module]:
    """One model chunk per virtual pipeline stage, each wrapped in DDP."""
    vpp = run.model.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        if vpp > 1:
            parallel_state.set_virtual_pipeline_model_parallel_rank(vp_stage)
        chunk = model_provider(run, pre_process=parallel_state.is_pipeline_first_stage(),
                               post_process=parallel_state.is_pipeline_last_stage(),
                               vp_stage=vp_stage if vpp > 1 else None)
        chunks.append(chunk)
    if vpp > 1:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    if not wrap_with_ddp:
        return chunks
    if run.ddp.use_torch_fsdp2:
        return [_fully_shard(chunk, run) for chunk in chunks]
    # Under fp16 dynamic loss scaling, overflowing grads are expected: the scaler skips
    # those steps, so only the loss check applies (Megatron behaves the same way).
    ddp = dataclasses.replace(run.ddp, check_for_nan_in_grad=run.ddp.check_for_nan_in_grad
                              and not _dynamic_loss_scaling(run))
    return [DistributedDataParallel(run.model, ddp, chunk,
                                    # Only the first chunk's buckets overlap with backward.
                                    disable_bucketing=index > 0)
            for index, chunk in enumerate(chunks)]


def _dynamic_loss_scaling(run: RunConfig) -> bool:
    return bool(run.model.fp16) and run.optimizer.loss_scale is None
def _fully_shard(chunk: torch.nn.Module, run: RunConfig) -> torch.nn.Module:
    """FSDP2 instead of DDP: fp32 master weights, bf16 compute with --bf16."""
    return fully_shard_model(
        chunk, reshard_after_forward=run.ddp.fsdp_reshard_after_forward,
        param_dtype=torch.bfloat16 if run.model.bf16 else None,
        reduce_dtype=torch.float32 if run.ddp.grad_reduce_in_fp32 else None)


def get_optimizer_param_scheduler(run: RunConfig, optimizer) -> OptimizerParamScheduler:
    """The lr/wd schedule in samples (Megatron counts both in samples when training by
    samples, in iterations x global batch otherwise)."""
    t, s, o = run.training, run.scheduler, run.optimizer
    gbs = t.global_batch_size
    if t.train_iters is not None:
        decay_iters = s.lr_decay_iters if s.lr_decay_iters is not None else t.train_iters
        decay_steps = decay_iters * gbs
        warmup_steps = (s.lr_warmup_fraction * decay_steps if s.lr_warmup_fraction is not None
                        else s.lr_warmup_iters * gbs)
        wsd_steps = (s.lr_wsd_decay_iters or 0) * gbs
    else:
        decay_steps = s.lr_decay_samples or t.train_samples
        warmup_steps = (s.lr_warmup_fraction * decay_steps if s.lr_warmup_fraction is not None
                        else s.lr_warmup_samples)
        wsd_steps = (s.lr_wsd_decay_samples if s.lr_wsd_decay_samples is not None
                     else (s.lr_wsd_decay_iters or 0) * gbs)
    start_wd = s.start_weight_decay if s.start_weight_decay is not None else o.weight_decay
    end_wd = s.end_weight_decay if s.end_weight_decay is not None else o.weight_decay
    return OptimizerParamScheduler(
        optimizer, init_lr=s.lr_warmup_init, max_lr=o.lr,
        min_lr=o.min_lr if o.min_lr is not None else 0.0,
        lr_warmup_steps=int(warmup_steps), lr_decay_steps=max(int(decay_steps), 1),
        lr_decay_style=s.lr_decay_style, start_wd=start_wd, end_wd=end_wd,
        wd_incr_steps=max(int(decay_steps), 1), wd_incr_style=s.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=s.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=s.override_opt_param_scheduler,
        wsd_decay_steps=int(wsd_steps) or None,
        lr_wsd_decay_style=s.lr_wsd_decay_style)


def microbatch_calculator(run: RunConfig) -> NumMicroBatchesCalculator:
    """Global batch size and micro-batch count per step (ramp-up or step schedule)."""
    t = run.training
    schedule = (parse_step_batch_size_schedule(t.step_batch_size_schedule, run.gpt.seq_length)
                if t.step_batch_size_schedule else None)
    return NumMicroBatchesCalculator(t.global_batch_size, t.micro_batch_size,
                                     run.data_parallel_size, t.rampup_batch_size, schedule)
# -- data -------------------------------------------------------------------------------
def _num_samples(run: RunConfig, state_train_samples: int) -> List[int]:
    t = run.training
    gbs = t.global_batch_size
    calculator = microbatch_calculator(run)
    if t.train_samples is not None:
        train_samples = t.train_samples
    else:  # the sum of each step's global batch (it may vary under a schedule)
        train_samples = 0
        for _ in range(t.train_iters or 0):
            train_samples += calculator.global_batch_size_at(train_samples)
    iters = t.train_iters if t.train_iters is not None else math.ceil(train_samples / gbs)
    eval_runs = iters // t.eval_interval + 1
    return [train_samples, eval_runs * t.eval_iters * gbs, t.eval_iters * gbs]


def build_data_iterators(run: RunConfig, datasets_provider: Callable, state: TrainState):
    """(train, valid, test) iterators for this rank, resuming at the consumed samples.

    With virtual pipeline stages each model chunk gets its own iterator over the same
    data, since every chunk's forward step reads (and may ignore) one micro-batch.
    """
    train_ds, valid_ds, test_ds = datasets_provider(run, _num_samples(run, 0))
    mbs = run.training.micro_batch_size
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    vpp = run.model.virtual_pipeline_model_parallel_size or 1

    def loaders(dataset, consumed, cyclic):
        out = []
        for _ in range(vpp):
            loader = build_pretraining_data_loader(
                dataset, consumed, micro_batch_size=mbs, data_parallel_rank=dp_rank,
                data_parallel_size=dp, num_workers=run.data.num_workers)
            if loader is None:
                out.append(None)
            else:
                out.append(cyclic_iter(loader) if cyclic else iter(loader))
        return out if vpp > 1 else out[0]

    train = loaders(train_ds, state.consumed_train_samples, False)
    valid = loaders(valid_ds, 0, True) if valid_ds is not None and len(valid_ds) else None
    test = loaders(test_ds, 0, True) if test_ds is not None and len(test_ds) else None
    return train, valid, test


# -- one step ---------------------------------------------------------------------------
def _average_losses(losses: List[Dict[str, Any]]) -> Dict[str, float]:
    """Mean over micro-batches of each reported loss (last pipeline stage only)."""
    if not losses:
        return {}
    out = {}
    for key in losses[0]:
        values = [d[key] for d in losses]
        if isinstance(values[0], (tuple, list)):  # (sum, count) per-token form
            total = sum(float(v[0]) for v in values)
            count = sum(float(v[1]) for v in values)
            out[key] = total / max(count, 1.0)
        else:
            out[key] = sum(float(v) for v in values) / len(values)
    return out


def _p2p_kwargs(run: RunConfig) -> Dict[str, Any]:
    """Pipeline schedules bound each p2p exchange by --distributed-timeout-minutes too."""
    if run.model.pipeline_model_parallel_size == 1:
        return {}
    return {"p2p_timeout": datetime.timedelta(minutes=run.training.distributed_timeout_minutes)}


def train_step(forward_step_func, data_iterator, model, optimizer, scheduler, run: RunConfig,
               num_microbatches: int, global_batch_size: int):
    """Forward/backward over the global batch, then the optimizer and schedule steps.

    The schedule's hooks (gradient sync of the DDP or FSDP2 chunks, loss scaling,
    finalization) are built here from ``model`` and ``optimizer``; nothing is kept on
    ``run``'s configs."""
    for chunk in model:
        if hasattr(chunk, "zero_grad_buffer"):
            chunk.zero_grad_buffer()
        else:  # FSDP2 chunk: sharded grads live in param.grad
            chunk.zero_grad(set_to_none=True)
    optimizer.zero_grad()
    moe = bool(run.model.num_moe_experts)
    if moe or run.model.mtp_num_layers:
        # Aux-loss (MoE balancing, multi-token prediction) gradients are scaled like the
        # main loss: loss scale / micro-batches; with the per-token loss the main loss is
        # not divided by the micro-batch count, and neither is the aux loss (Megatron-LM's
        # rule).
        divisor = 1 if run.model.calculate_per_token_loss else num_microbatches
        set_moe_aux_loss_scale(model, float(optimizer.get_loss_scale()) / divisor)
    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=forward_step_func, data_iterator=data_iterator,
        model=model if len(model) > 1 else model[0], num_microbatches=num_microbatches,
        seq_length=run.gpt.seq_length, micro_batch_size=run.training.micro_batch_size,
        forward_only=False, hooks=build_training_hooks(model, optimizer), **_p2p_kwargs(run))
    update_successful, grad_norm, num_zeros = optimizer.step()
    if update_successful:
        scheduler.step(increment=global_batch_size)
    if moe and run.model.moe_router_enable_expert_bias:
        update_router_expert_bias(model)
    return _average_losses(losses), update_successful, grad_norm, num_zeros


def evaluate(forward_step_func, data_iterator, model, run: RunConfig, eval_iters: int,
             num_microbatches: int) -> Dict[str, float]:
    """Mean validation losses over ``eval_iters`` global batches (forward only)."""
    for chunk in model:
        chunk.eval()
    forward_backward = get_forward_backward_func()
    totals: Dict[str, float] = {}
    with torch.no_grad():
        for _ in range(eval_iters):
            losses = forward_backward(
                forward_step_func=forward_step_func, data_iterator=data_iterator,
                model=model if len(model) > 1 else model[0], num_microbatches=num_microbatches,
                seq_length=run.gpt.seq_length, micro_batch_size=run.training.micro_batch_size,
                forward_only=True, **_p2p_kwargs(run))
            for key, value in _average_losses(losses).items():
                totals[key] = totals.get(key, 0.0) + value / eval_iters
    for chunk in model:
        chunk.train()
    return totals


# -- the loop ---------------------------------------------------------------------------
class _ExitSignal:
    """SIGTERM sets a flag; ranks agree on it at the end of an iteration."""

    def __init__(self, enabled: bool):
        self.received = False
        self._previous = None
        if enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank_received(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _flops_per_step(run: RunConfig, padded_vocab: int, global_batch_size: int) -> float:
    m = run.model
    experts = getattr(m, "num_moe_experts", None)
    freq = getattr(m, "moe_layer_freq", 1)
    fraction = (sum(freq) / len(freq)) if isinstance(freq, (list, tuple)) else 1.0 / max(freq, 1)
    return num_floating_point_operations(
        batch_size=global_batch_size, seq_length=run.gpt.seq_length, num_layers=m.num_layers,
        hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size, padded_vocab_size=padded_vocab,
        kv_channels=m.kv_channels, num_query_groups=m.num_query_groups,
        gated_linear_unit=m.gated_linear_unit, num_experts=experts,
        moe_router_topk=getattr(m, "moe_router_topk", 1),
        moe_ffn_hidden_size=getattr(m, "moe_ffn_hidden_size", None),
        shared_expert_ffn_hidden_size=getattr(m, "moe_shared_expert_intermediate_size", None) or 0,
        moe_layer_fraction=fraction if experts else 1.0)


def _peak_tflops() -> Optional[float]:
    if device.device_type() != "cuda":
        return None
    name = device.device_name()
    return next((v for k, v in _PEAK_TFLOPS.items() if k in name), None)


def _memory_mb() -> float:
    if device.device_type() == "cuda":
        return device.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def params_norm(model: List[torch.nn.Module]) -> float:
    """L2 norm of all model parameters, each counted once over every rank (collective).

    Uses the optimizer's rule for gradient statistics: tp-duplicates and tied copies count
    zero, and replicas over data (and expert-data) parallel ranks are weighted 1/replicas
    so that one all-reduce over the world sums every parameter exactly once.
    """
    sharded = any(is_fully_sharded(chunk) for chunk in model)  # FSDP2: disjoint dp shards
    context = GradStatsContext(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        expert_tp_rank=parallel_state.get_expert_tensor_parallel_rank(),
        is_first_pipeline_stage=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        dense_replicas=1 if sharded else
        parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        expert_replicas=1 if sharded else parallel_state.get_expert_data_parallel_world_size())
    pairs = [(p.data, p) for chunk in model for p in chunk.parameters()]
    total = local_grad_norm_squared(pairs, context, device.current_device())
    dist.all_reduce(total)
    return float(total.sqrt().item())


def _padded_vocab(model) -> int:
    for chunk in model:
        inner = chunk.module if hasattr(chunk, "module") else chunk
        if hasattr(inner, "padded_vocab_size"):
            return inner.padded_vocab_size
    return 0


def _finalize_async_save(run, state, blocking: bool) -> None:
    """Finalize a pending background save (collective) and say so once it is complete."""
    if checkpointing.finalize_async_saves(blocking=blocking) and \
            state.pending_async_save is not None:
        print_rank_0(f"saved checkpoint at iteration {state.pending_async_save} to "
                     f"{run.checkpoint.save}")
        state.pending_async_save = None


def _save(run, state, model, optimizer, scheduler):
    if run.checkpoint.async_save:
        _finalize_async_save(run, state, blocking=True)
    checkpointing.save_checkpoint(
        state.iteration, model, optimizer, scheduler, save_dir=run.checkpoint.save,
        ckpt_format=run.checkpoint.ckpt_format,
        consumed_train_samples=state.consumed_train_samples,
        consumed_valid_samples=state.consumed_valid_samples,
        config_dict=run_config_to_dict(run), async_save=run.checkpoint.async_save,
        extra_state={"skipped_iterations": state.skipped_iterations,
                     "nan_iterations": state.nan_iterations})
    if run.checkpoint.async_save:
        # "saved" is printed when the background writes are finalized (tracker written).
        state.pending_async_save = state.iteration
        print_rank_0(f"started asynchronous checkpoint save at iteration {state.iteration}")
    else:
        print_rank_0(f"saved checkpoint at iteration {state.iteration} to "
                     f"{run.checkpoint.save}")


def load_any_checkpoint(model, optimizer, scheduler, *, load_dir: str, no_load_optim: bool,
                        no_load_rng: bool, finetune: bool = False):
    """:func:`checkpointing.load_checkpoint`, or, for a Megatron-LM checkpoint, its weights
    loaded in memory through the converter (``load_megatron_checkpoint``)."""
    loader = load_megatron_checkpoint if is_megatron_checkpoint(load_dir) \
        else checkpointing.load_checkpoint
    return loader(model, optimizer, scheduler, load_dir=load_dir, no_load_optim=no_load_optim,
                  no_load_rng=no_load_rng, finetune=finetune)


def _load(run, state, model, optimizer, scheduler):
    c = run.checkpoint
    try:
        iteration, consumed_train, consumed_valid, _ = load_any_checkpoint(
            model, optimizer, scheduler, load_dir=c.load, no_load_optim=c.no_load_optim,
            no_load_rng=c.no_load_rng, finetune=c.finetune)
    except ValueError as e:
        if "optimizer param scheduler" not in str(e):
            raise
        raise ValueError(f"--load {c.load}: {e} (flags: --use-checkpoint-opt_param-scheduler "
                         "or --override-opt_param-scheduler)") from e
    state.iteration = iteration
    state.consumed_train_samples = consumed_train
    state.consumed_valid_samples = consumed_valid
    print_rank_0(f"loaded checkpoint from {c.load} at iteration {iteration}")


def _train(run, state, forward_step_func, model, optimizer, scheduler, train_iter, valid_iter,
           logger: MetricsLogger, exit_signal: _ExitSignal, start_time: float) -> str:
    t, c = run.training, run.checkpoint
    calculator = microbatch_calculator(run)
    padded_vocab = _padded_vocab(model)
    peak = _peak_tflops()
    train_iters = t.train_iters
    if train_iters is None:
        train_iters = _iters_for_samples(calculator, t.train_samples)
    last_log = time.time()
    seq = run.gpt.seq_length
    profiler = _Profiler(run.logging)
    while state.iteration < train_iters:
        gbs = calculator.global_batch_size_at(state.consumed_train_samples)
        num_mb = calculator.num_microbatches_at(state.consumed_train_samples)
        profiler.before_step(state.iteration)
        try:
            losses, ok, grad_norm, num_zeros = train_step(
                forward_step_func, train_iter, model, optimizer, scheduler, run, num_mb, gbs)
        except NonFiniteGradientError as exc:
            raise NonFiniteTrainingError(
                f"iteration {state.iteration + 1}: {exc}; stopping the run (no checkpoint is "
                f"written from this state; {_NAN_CHECK_FLAG} turns the check off)") from exc
        profiler.after_step(state.iteration)
        _after_step_housekeeping(t, state.iteration + 1)
        if run.ddp.check_for_nan_in_grad:
            _stop_on_non_finite(state.iteration + 1, losses.get("lm loss"),
                                None if _dynamic_loss_scaling(run) else grad_norm)
        state.iteration += 1
        state.consumed_train_samples += gbs
        if not ok:
            state.skipped_iterations += 1
        loss_value = losses.get("lm loss")
        if loss_value is not None and not math.isfinite(loss_value):
            state.nan_iterations += 1
        if state.iteration % run.logging.log_interval == 0:
            elapsed = (time.time() - last_log) / run.logging.log_interval
            last_log = time.time()
            flops = _flops_per_step(run, padded_vocab, gbs)
            tflops = flops / elapsed / 1e12 / dist.get_world_size()
            metrics = {
                "consumed_samples": state.consumed_train_samples,
                "elapsed_ms_per_iteration": elapsed * 1000.0,
                "tokens_per_sec": gbs * seq / elapsed,
                "tflops_per_device": tflops, "mfu": tflops / peak if peak else None,
                "lr": optimizer.param_groups[0]["lr"],
                "global_batch_size": gbs,
                "lm_loss": loss_value,
                "loss_scale": float(optimizer.get_loss_scale()),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "num_zeros": float(num_zeros) if num_zeros is not None else None,
                "skipped_iterations": state.skipped_iterations,
                "nan_iterations": state.nan_iterations,
                "memory_mb": _memory_mb(),
            }
            metrics.update({k.replace(" ", "_"): v for k, v in losses.items() if k != "lm loss"})
            if run.logging.log_params_norm:
                metrics["params_norm"] = params_norm(model)  # collective: every rank
            if run.model.num_moe_experts:
                # Collective over tp x cp x dp: every rank reduces, the last rank logs.
                metrics.update(reduce_moe_metrics(model, per_layer=run.model.moe_per_layer_logging))
                reset_moe_metrics(model)
            if _is_logging_rank():
                logger.log(state.iteration, metrics)
        if valid_iter is not None and t.eval_iters and state.iteration % t.eval_interval == 0:
            _collect_garbage(t)
            _run_eval(run, state, forward_step_func, valid_iter, model, logger, calculator,
                      "validation")
            _collect_garbage(t)
            if t.empty_unused_memory_level >= 2:
                device.empty_cache()
        if c.save and c.async_save:
            _finalize_async_save(run, state, blocking=False)  # collective, cheap
        if c.save and c.save_interval and state.iteration % c.save_interval == 0:
            _save(run, state, model, optimizer, scheduler)
        reason = _exit_reason(run, state, exit_signal, start_time)
        if reason:
            profiler.stop()
            return reason
    profiler.stop()
    return "done"


_NAN_CHECK_FLAG = "--no-check-for-nan-in-loss-and-grad"


class NonFiniteTrainingError(RuntimeError):
    """A training step produced a NaN/Inf loss or gradient (names the iteration and
    ranks); raised on every rank before anything is saved from that state."""


def _stop_on_non_finite(iteration: int, loss: Optional[float],
                        grad_norm: Optional[float]) -> None:
    """Collective over the world: raise on every rank when any rank saw a non-finite loss
    (only the last pipeline stage has one) or grad norm. One all-reduce of ``world``
    numbers, each rank writing its own slot (1: loss, 2: grad norm)."""
    flags = torch.zeros(dist.get_world_size())
    if loss is not None and not math.isfinite(loss):
        flags[dist.get_rank()] = 1
    elif grad_norm is not None and not math.isfinite(float(grad_norm)):
        flags[dist.get_rank()] = 2
    dist.all_reduce(flags)
    bad = {r: int(v) for r, v in enumerate(flags.tolist()) if v}
    if bad:
        what = " and ".join(sorted({"loss" if v == 1 else "gradient norm"
                                    for v in bad.values()}))
        raise NonFiniteTrainingError(
            f"iteration {iteration}: non-finite (NaN/Inf) {what} on rank(s) {sorted(bad)}; "
            f"stopping the run (no checkpoint is written from this state; {_NAN_CHECK_FLAG} "
            "turns the check off)")
def _collect_garbage(t) -> None:
    """--manual-gc: collect now (every rank at the same point of the step)."""
    if t.manual_gc:
        gc.collect()


def _after_step_housekeeping(t, iteration: int) -> None:
    if t.empty_unused_memory_level >= 1:
        device.empty_cache()
    if t.manual_gc and t.manual_gc_interval and iteration % t.manual_gc_interval == 0:
        gc.collect()


class _Profiler:
    """--profile: a torch.profiler trace of steps [profile_step_start, profile_step_end)
    on --profile-ranks, written as a Chrome/TensorBoard trace file."""

    def __init__(self, logging_args):
        self.args = logging_args
        self.active = None
        self.enabled = logging_args.profile and dist.get_rank() in logging_args.profile_ranks

    def before_step(self, iteration: int) -> None:
        if self.enabled and self.active is None and iteration == self.args.profile_step_start:
            out_dir = self.args.tensorboard_dir or "profile"
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.device_type() == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.active = torch.profiler.profile(
                activities=activities, record_shapes=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(
                    out_dir, worker_name=f"rank{dist.get_rank()}"))
            self.active.start()
            print(f"profiling steps {self.args.profile_step_start}-"
                  f"{self.args.profile_step_end - 1} on rank {dist.get_rank()} into {out_dir}",
                  flush=True)

    def after_step(self, iteration: int) -> None:
        if self.active is not None and iteration + 1 >= self.args.profile_step_end:
            self.stop()

    def stop(self) -> None:
        if self.active is not None:
            self.active.stop()  # writes the trace (on_trace_ready)
            self.active = None


def _iters_for_samples(calculator: NumMicroBatchesCalculator, train_samples: int) -> int:
    iters, consumed = 0, 0
    while consumed < train_samples:
        consumed += calculator.global_batch_size_at(consumed)
        iters += 1
    return iters


def _is_logging_rank() -> bool:
    # Losses live on the last pipeline stage; its last rank prints (Megatron's choice).
    # Under ZBV's V the last stage is pipeline rank 0: the first rank of the last rank's
    # pipeline group prints.
    last = dist.get_world_size() - 1
    if not parallel_state.is_virtual_pipeline_v_shape():
        return dist.get_rank() == last
    pp_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    return pp_ranks[-1] == last and dist.get_rank() == pp_ranks[0]


def _run_eval(run, state, forward_step_func, valid_iter, model, logger, calculator, name):
    num_mb = calculator.num_microbatches_at(state.consumed_train_samples)
    results = evaluate(forward_step_func, valid_iter, model, run, run.training.eval_iters, num_mb)
    state.consumed_valid_samples += run.training.eval_iters * \
        calculator.global_batch_size_at(state.consumed_train_samples)
    if _is_logging_rank() and results:
        text = " | ".join(f"{k} value: {v:.6E} | {k} PPL: {math.exp(min(v, 50)):.6E}"
                          for k, v in results.items())
        print(f" {name} loss at iteration {state.iteration} | {text}", flush=True)
        logger.log(state.iteration, {k.replace(" ", "_"): v for k, v in results.items()},
                   prefix=f"{name}_")
    return results


def _exit_reason(run, state, exit_signal: _ExitSignal, start_time: float) -> Optional[str]:
    t = run.training
    if t.exit_signal_handler and exit_signal.any_rank_received():
        return "signal"
    if t.exit_interval and state.iteration % t.exit_interval == 0:
        return "exit-interval"
    if t.exit_duration_in_mins:
        elapsed = torch.tensor([(time.time() - start_time) / 60.0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if elapsed.item() > t.exit_duration_in_mins:
            return "exit-duration"
    return None


def pretrain(train_valid_test_datasets_provider: Callable, model_provider: Callable,
             model_type: Any, forward_step_func: Callable, *,
             argv: Optional[Sequence[str]] = None, run_config: Optional[RunConfig] = None,
             extra_args_provider: Optional[Callable] = None) -> Dict[str, Any]:
    """Train a model from Megatron-style flags (``argv``, default ``sys.argv[1:]``).

    Args:
        train_valid_test_datasets_provider: ``(run, [n_train, n_valid, n_test]) ->
            (train_ds, valid_ds, test_ds)``.
        model_provider: ``(run, pre_process, post_process, vp_stage) -> module``.
        model_type: ``ModelType.encoder_or_decoder`` (kept for Megatron compatibility).
        forward_step_func: ``(data_iterator, model) -> (output_tensor, loss_func)``.
        run_config: an already parsed configuration (skips flag parsing).

    Returns:
        A summary: final iteration, last losses, exit reason.
    """
    start_time = time.time()
    if run_config is None:
        # Parsed before the process group starts: its timeout is a flag.
        run_config = _parse(sys.argv[1:] if argv is None else argv, extra_args_provider)
    t = run_config.training
    owns_process_group = initialize_distributed(t.distributed_backend,
                                                t.distributed_timeout_minutes)
    succeeded = False
    try:
        summary = _pretrain(train_valid_test_datasets_provider, model_provider,
                            forward_step_func, run_config, start_time)
        succeeded = True
        return summary
    except BaseException as exc:
        _report_communication_failure(exc, t.distributed_timeout_minutes)
        raise
    finally:
        if owns_process_group:
            shutdown_distributed(barrier=succeeded)


def shutdown_distributed(barrier: bool = True) -> None:
    """Tear down in order, the default process group last, so that no C++ thread of a
    group (gloo's workers and transport loop) is still joinable when the interpreter
    exits: release what still references groups (data iterators, device meshes: one
    garbage collection), wait for every rank at a barrier (no rank closes its connections
    while a peer still uses them; skipped after a failure, where peers may be gone), then
    forget the model-parallel and checkpoint groups and destroy every group."""
    gc.collect()
    if barrier and dist.is_initialized():
        dist.barrier()
    reset_async_state()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _parse(argv: Sequence[str], extra_args_provider) -> RunConfig:
    """Parse once (command line and ``--yaml-cfg``), then read the checkpoint that the
    parsed ``--load`` names: a ``load:`` in the YAML file counts like the flag."""
    flags = read_flag_values(argv, extra_args_provider=extra_args_provider)
    load_dir = flags.values.get("load")
    saved = saved_run_config(load_dir) if load_dir else None
    world = dist.get_world_size() if dist.is_initialized() \
        else int(os.environ.get("WORLD_SIZE", "1"))
    return run_config_from_flags(flags, world_size=world, checkpoint_config=saved,
                                 checkpoint_path=load_dir or "")


def _report_communication_failure(exc: BaseException, timeout_minutes: float) -> None:
    """One line naming the collective, its caller and the peer (when torch says) for a
    failed or timed-out collective: a stopped or dead peer ends every rank this way."""
    if not isinstance(exc, RuntimeError) or not _looks_like_communication_failure(exc):
        return
    frames = traceback.extract_tb(exc.__traceback__)
    op = next((f.name for f in reversed(frames) if "torch/distributed" in f.filename
               and not f.name.startswith("_") and f.name != "wrapper"), None)
    # Collectives inside autograd's backward run below C++ frames: no torch name then.
    op = f"torch.distributed {op}" if op else "a torch.distributed collective"
    caller = next((f for f in reversed(frames) if "/megacore/" in f.filename
                   or "/examples/" in f.filename), None)
    where = f" called from {caller.name} ({caller.filename}:{caller.lineno})" if caller else ""
    rank = dist.get_rank() if dist.is_initialized() else 0
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"rank {rank}: {op}{where} failed or timed out (--distributed-timeout-minutes "
          f"{timeout_minutes:g}): {first_line}", file=sys.stderr, flush=True)


def _looks_like_communication_failure(exc: BaseException) -> bool:
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed by peer",
                                   "connection reset", "gloo"))


def _pretrain(train_valid_test_datasets_provider, model_provider, forward_step_func,
              run_config, start_time) -> Dict[str, Any]:
    run = run_config
    _resolve_missing_checkpoint(run)
    initialize_model_parallel_from_run(run)
    config_path = write_resolved_config(run) if dist.get_rank() == 0 else None
    print_rank_0(run_summary(run, dist.get_world_size(), config_path))
    for note in run.notes:
        print_rank_0(note)

    model = get_model(model_provider, run)
    optimizer = get_megatron_optimizer(run.optimizer, model)
    scheduler = get_optimizer_param_scheduler(run, optimizer)
    state = TrainState()
    if run.checkpoint.load:
        _load(run, state, model, optimizer, scheduler)
    if run.checkpoint.ckpt_convert_format:
        return _convert_and_exit(run, state, model, optimizer, scheduler)

    train_iter, valid_iter, test_iter = build_data_iterators(
        run, train_valid_test_datasets_provider, state)
    logger = MetricsLogger(log_jsonl=run.logging.log_jsonl if _is_logging_rank() else None,
                           tensorboard_dir=run.logging.tensorboard_dir if _is_logging_rank() else None,
                           wandb_project=run.logging.wandb_project if _is_logging_rank() else None,
                           wandb_exp_name=run.logging.wandb_exp_name,
                           train_iters=run.training.train_iters,
                           config_dict=run_config_to_dict(run))
    exit_signal = _ExitSignal(run.training.exit_signal_handler)
    reason = "skip-train"
    gc_was_enabled = gc.isenabled()
    if run.training.manual_gc:
        gc.disable()  # Megatron's --manual-gc: collect only at chosen points
        gc.collect()
    try:
        if not run.training.skip_train:
            reason = _train(run, state, forward_step_func, model, optimizer, scheduler,
                            train_iter, valid_iter, logger, exit_signal, start_time)
        if run.checkpoint.save and reason != "skip-train" and not _just_saved(run, state):
            _save(run, state, model, optimizer, scheduler)
        summary: Dict[str, Any] = {"iteration": state.iteration, "exit_reason": reason,
                                   "consumed_train_samples": state.consumed_train_samples}
        if reason == "done" and run.training.eval_iters:
            calc = NumMicroBatchesCalculator(run.training.global_batch_size,
                                             run.training.micro_batch_size,
                                             run.data_parallel_size)
            # The loop already evaluated at the last iteration when it is a multiple of
            # --eval-interval; a second evaluation on the next batches would print a
            # different validation loss for the same weights.
            validated = state.iteration % run.training.eval_interval == 0
            for key, name, iterator in (("validation", "validation (end of training)", valid_iter),
                                        ("test", "test", test_iter)):
                if iterator is not None and not (key == "validation" and validated):
                    summary[key] = _run_eval(run, state, forward_step_func, iterator, model,
                                             logger, calc, name)
    finally:
        if run.checkpoint.save:
            _finalize_async_save(run, state, blocking=True)
        logger.close()
        exit_signal.restore()
        if gc_was_enabled:
            gc.enable()
    return summary


def checkpoint_is_missing(load_dir: str) -> bool:
    """True when ``load_dir`` holds no checkpoint: it does not exist, or has neither a
    tracker file nor the files of an iteration directory (empty, or only e.g. the
    TensorBoard logs Megatron-LM's Mixtral script writes under the checkpoint path). That
    is a first start of an auto-resuming ``--save X --load X`` run. A tracker that names
    a missing iteration is loaded and reported as the error it is."""
    if not os.path.isdir(load_dir):
        return True
    return checkpointing.read_tracker(load_dir) is None and \
        detect_format(load_dir, missing_ok=True) is None


def _resolve_missing_checkpoint(run: RunConfig) -> None:
    """Megatron's auto-resume: ``--load`` of a missing or empty directory trains from
    scratch after one warning line; ``--exit-on-missing-checkpoint`` makes it an error."""
    c = run.checkpoint
    if not c.load or not checkpoint_is_missing(c.load):
        return
    if c.exit_on_missing_checkpoint:
        raise checkpointing.CheckpointError(
            f"--load {c.load}: no checkpoint there, and --exit-on-missing-checkpoint is set")
    print_rank_0(f"WARNING: --load {c.load}: no checkpoint found; training from scratch")
    run.checkpoint = dataclasses.replace(c, load=None)


def saved_run_config(load_dir: str) -> Optional[Dict[str, Any]]:
    """The run configuration stored with the latest checkpoint under ``load_dir`` (or the
    iteration directory ``load_dir``); None when there is no checkpoint yet, e.g.
    ``--save d --load d`` on a first start."""
    if checkpoint_is_missing(load_dir):
        return None
    if is_megatron_checkpoint(load_dir):  # the model from Megatron-LM's stored args
        return megatron_run_config(load_dir)
    config = checkpointing.read_checkpoint_info(load_dir).config
    # A converted checkpoint keeps its tokenizer inside it, under a relative path.
    return resolve_checkpoint_paths(config, load_dir) if config else config


def _just_saved(run, state) -> bool:
    c = run.checkpoint
    return bool(c.save_interval) and state.iteration % c.save_interval == 0


def _convert_and_exit(run, state, model, optimizer, scheduler) -> Dict[str, Any]:
    """``--ckpt-convert-format F --ckpt-convert-save DIR``: re-save the loaded checkpoint."""
    converted = dataclasses.replace(
        run.checkpoint, save=run.checkpoint.ckpt_convert_save,
        ckpt_format=run.checkpoint.ckpt_convert_format, async_save=False)
    run = dataclasses.replace(run, checkpoint=converted)
    _save(run, state, model, optimizer, scheduler)
    return {"iteration": state.iteration, "exit_reason": "converted"}
