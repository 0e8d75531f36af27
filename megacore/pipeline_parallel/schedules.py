"""Forward/backward schedules over micro-batches: none, 1F1B, interleaved 1F1B, ZB-H1, ZBV.

``get_forward_backward_func()`` returns the schedule for the current grid; every schedule
has Megatron-Core's contract::

    losses = forward_backward_func(
        forward_step_func=..., data_iterator=..., model=..., num_microbatches=...,
        seq_length=..., micro_batch_size=..., forward_only=False,
        hooks=TrainingHooks(...))

* ``forward_step_func(data_iterator, model) -> (output_tensor, loss_func)``; on the last
  stage ``loss_func(output_tensor)`` returns ``(loss, {"lm loss": reduced})`` (the loss is
  divided by ``num_microbatches`` here) or ``(loss, num_tokens, {...})`` (per-token form:
  not divided; the summed ``num_tokens`` goes to ``hooks.finalize_model_grads_func``).
* Received activations reach a stage through ``model.set_input_tensor(tensor)`` (``None``
  on the first stage); the model returns its output activation ``[s, b, h]``.
* ``hooks`` (:class:`.training_hooks.TrainingHooks`, optional): ``grad_scale_func``
  scales the loss before the first backward, ``no_sync_func`` defers data-parallel
  gradient reduction until a chunk's last backward (or, with ``grad_sync_func`` set, the
  schedule calls that after it instead), ``param_sync_func`` starts a chunk's parameter
  all-gather ahead of its forward, ``timers`` time compute and p2p, and
  ``finalize_model_grads_func(model_list)`` runs once at the end of training steps.
  Without ``hooks`` the deprecated hook fields of the model's config (``model.config``,
  or ``model.module.config`` through wrappers) are used, with a warning.
* Returns the list of loss dicts on the last pipeline stage, ``[]`` elsewhere.

``config.pipeline_schedule = "zb-h1"`` makes the non-interleaved schedule zero-bubble:
each backward runs as B (input gradient, :class:`.backward_split.SplitBackward`) and,
later, W (weight gradients); sends do not wait (their completion is awaited at the
next exchange), so W steps fill the time a rank would spend waiting.

``config.pipeline_schedule = "zbv"`` runs the interleaved schedule's two chunks per rank
in a V (rank ``r`` holds virtual stages ``r`` and ``2 pp - 1 - r``, see
:class:`.schedule_plan.StageLayout`) with split backwards: chunk 1 sends activations to
the previous rank and gradients to the next; the last rank hands its chunk 0's output to
its chunk 1 in memory; the loss is computed on rank 0's chunk 1. Sends are waited for
only at the end of the step (or released once complete). Needs gloo (tag-matched p2p).

The pipelined schedules do not decide on the fly: :mod:`.schedule_plan` computes each
rank's order of compute and communication steps as data (tested, with all stages
together, by a simulator), and :class:`_PipelineRun` below walks it. Tensors between
stages are ``[s, b, h]`` with ``s = seq_length / cp`` (``/ tp`` under sequence
parallelism); see :func:`.p2p_communication.get_tensor_shape`.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megacore import parallel_state
from megacore.model_parallel_config import ModelParallelConfig
from megacore.pipeline_parallel import schedule_plan as plan_lib
from megacore.pipeline_parallel.backward_split import SplitBackward
from megacore.pipeline_parallel.p2p_communication import (
    P2PCommunicator,
    PendingSends,
    get_tensor_shape,
)
from megacore.pipeline_parallel.schedule_plan import Step
from megacore.pipeline_parallel.training_hooks import TrainingHooks, resolve_hooks

__all__ = [
    "get_forward_backward_func",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
    "forward_step",
    "backward_step",
    "get_attr_wrapped_model",
    "get_model_config",
    "deallocate_output_tensor",
    "custom_backward",
]

Model = torch.nn.Module


def get_forward_backward_func() -> Callable[..., List[Any]]:
    """The schedule for the default grid: no pipelining, 1F1B, or interleaved 1F1B."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return forward_backward_no_pipelining
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is not None and vpp > 1:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


# --------------------------------------------------------------------------------------
# Model access through wrappers (DDP, Float16Module ... expose the model as .module)
# --------------------------------------------------------------------------------------
def get_attr_wrapped_model(model: Model, attr: str) -> Any:
    """``getattr(model, attr)``, looking through ``.module`` wrappers."""
    inner = model
    while not hasattr(inner, attr):
        if not hasattr(inner, "module"):
            raise AttributeError(f"{type(model).__name__} (and the modules it wraps) has "
                                 f"no attribute {attr!r}; pipeline stages need it")
        inner = inner.module
    return getattr(inner, attr)


def get_model_config(model: Model) -> ModelParallelConfig:
    """The config a model (or the model inside its wrappers) was built with."""
    return get_attr_wrapped_model(model, "config")


# --------------------------------------------------------------------------------------
# One forward, one backward
# --------------------------------------------------------------------------------------
def forward_step(forward_step_func: Callable, data_iterator: Optional[Iterator], model: Model,
                 num_microbatches: int, input_tensor: Optional[torch.Tensor],
                 forward_data_store: List[Any], config: ModelParallelConfig, *,
                 is_last_stage: bool, collect_non_loss_data: bool = False
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run one micro-batch through one model chunk.

    Returns:
        ``(output, num_tokens)``: the activation to send on, or on the last stage the
        (scaled) loss to differentiate; ``num_tokens`` only for the per-token loss form.
    """
    get_attr_wrapped_model(model, "set_input_tensor")(input_tensor)
    output_tensor, loss_func = forward_step_func(data_iterator, model)
    if not is_last_stage:
        return output_tensor, None
    if collect_non_loss_data:
        forward_data_store.append(loss_func(output_tensor, non_loss_data=True))
        return output_tensor, None
    outputs = loss_func(output_tensor)
    if len(outputs) == 3:
        loss, num_tokens, reduced = outputs
    elif len(outputs) == 2:
        (loss, reduced), num_tokens = outputs, None
        loss = loss / num_microbatches
    else:
        raise ValueError("loss_func must return (loss, dict) or (loss, num_tokens, dict), "
                         f"got {len(outputs)} values")
    forward_data_store.append(reduced)
    return loss, num_tokens


def custom_backward(output: torch.Tensor, grad_output: Optional[torch.Tensor]) -> None:
    """Backward from ``output`` whose data may have been freed (shape check skipped).

    ``torch.autograd.backward`` insists that the gradient matches ``output.shape``, which
    a deallocated output (``data`` replaced by a 1-element tensor) no longer has; the
    engine itself only needs the graph.
    """
    if grad_output is None:
        grad_output = torch.ones_like(output)
    torch.autograd.Variable._execution_engine.run_backward(
        tensors=(output,), grad_tensors=(grad_output,), keep_graph=False,
        create_graph=False, inputs=tuple(), allow_unreachable=True, accumulate_grad=True)


def deallocate_output_tensor(output: Optional[torch.Tensor], deallocate: bool) -> None:
    """Free a sent activation's memory, keeping its ``grad_fn`` for the backward pass.

    Safe only when the last operation of the stage does not save its own output for
    backward (a linear layer, residual add or dropout; not ``tanh`` or ``exp``).
    """
    if not deallocate or output is None:
        return
    assert output._base is None, "cannot deallocate a view: its storage is shared"
    output.data = torch.empty((1,), device=output.device, dtype=output.dtype)


def backward_step(input_tensor: Optional[torch.Tensor], output_tensor: torch.Tensor,
                  output_tensor_grad: Optional[torch.Tensor],
                  config: ModelParallelConfig, *,
                  hooks: Optional[TrainingHooks] = None) -> Optional[torch.Tensor]:
    """Backward of one micro-batch through one chunk; returns the input's gradient.

    ``output_tensor_grad`` is None on the last stage, where ``output_tensor`` is the loss:
    ``hooks.grad_scale_func`` (the fp16 loss scaler) is applied to it there. Without
    ``hooks``, the config's deprecated ``grad_scale_func`` is used (the schedules pass the
    hooks they resolved once, and a schedule refuses hooks given in both places).
    """
    if hooks is None:
        hooks = resolve_hooks(None, config)
    if input_tensor is not None:
        input_tensor.retain_grad()
    if output_tensor_grad is None and hooks.grad_scale_func is not None:
        output_tensor = hooks.grad_scale_func(output_tensor)
    if config.deallocate_pipeline_outputs:
        custom_backward(output_tensor, output_tensor_grad)
    else:
        torch.autograd.backward(output_tensor, grad_tensors=output_tensor_grad)
    if input_tensor is None:
        return None
    if input_tensor.grad is None:
        raise RuntimeError("the stage's output does not depend on the tensor given to "
                           "set_input_tensor; a pipeline stage must use its input")
    return input_tensor.grad


# --------------------------------------------------------------------------------------
# Gradient-sync hooks (no_sync_func / grad_sync_func), per model chunk
# --------------------------------------------------------------------------------------
_GRAD_ACCUMULATING_OPS = (plan_lib.BACKWARD, plan_lib.BACKWARD_WEIGHT)


class _GradSync:
    """Keeps data-parallel gradient reduction off until each chunk's last backward.

    ``hooks.no_sync_func`` is one context-manager factory (covering every chunk) or a
    sequence, one per chunk. Without ``grad_sync_func`` the chunk's context is left just
    before its last backward so DDP reduces during it; with ``grad_sync_func`` the
    contexts stay on and ``grad_sync_func(chunk parameters)`` is called after the chunk's
    last backward.
    """

    def __init__(self, hooks: TrainingHooks, models: Sequence[Model],
                 steps: Sequence[Step]):
        self.models = models
        self.grad_sync = hooks.grad_sync_func
        no_sync = hooks.no_sync_func
        self.per_chunk = isinstance(no_sync, (list, tuple))
        factories = list(no_sync) if self.per_chunk else [no_sync]
        self.factories = [f or contextlib.nullcontext for f in factories]
        # The steps that accumulate parameter gradients: whole backwards, or the W halves.
        backwards = [i for i, s in enumerate(steps) if s.op in _GRAD_ACCUMULATING_OPS]
        self.last_backward = {steps[i].chunk: i for i in backwards}
        self.final_backward = backwards[-1] if backwards else None
        self.stacks = [contextlib.ExitStack() for _ in self.factories]
        if self.per_chunk and len(self.factories) != len(models):
            raise ValueError(f"hooks.no_sync_func lists {len(self.factories)} functions for "
                             f"{len(models)} model chunks")

    def start(self) -> None:
        for factory, stack in zip(self.factories, self.stacks):
            stack.enter_context(factory())

    def before_backward(self, position: int, chunk: int) -> None:
        if self.grad_sync is not None:
            return
        if self.per_chunk and self.last_backward.get(chunk) == position:
            self.stacks[chunk].close()
        elif not self.per_chunk and position == self.final_backward:
            self.stacks[0].close()

    def after_backward(self, position: int, chunk: int) -> None:
        if self.grad_sync is None or self.last_backward.get(chunk) != position:
            return
        _for_chunk(self.grad_sync, chunk)(self.models[chunk].parameters())

    def finish(self) -> None:
        for stack in self.stacks:
            stack.close()


def _for_chunk(hook: Any, chunk: int) -> Callable:
    """A per-chunk hook's function for ``chunk`` (one function serves every chunk)."""
    return hook[chunk] if isinstance(hook, (list, tuple)) else hook


class _ParamSync:
    """Starts each chunk's parameter all-gather (``hooks.param_sync_func``) one chunk
    ahead: chunk 0 when the step starts, chunk c + 1 at chunk c's first forward, so the
    gather overlaps compute; the model's forward pre-hooks wait for it. Training steps
    only: evaluation forwards gather lazily in those pre-hooks."""

    def __init__(self, hooks: TrainingHooks, models: Sequence[Model], forward_only: bool):
        self.func = None if forward_only else hooks.param_sync_func
        self.models = models
        self.dispatched: set = set()
        if isinstance(self.func, (list, tuple)) and len(self.func) != len(models):
            raise ValueError(f"hooks.param_sync_func lists {len(self.func)} functions for "
                             f"{len(models)} model chunks")

    def dispatch(self, chunk: int) -> None:
        if self.func is None or chunk >= len(self.models) or chunk in self.dispatched:
            return
        self.dispatched.add(chunk)
        _for_chunk(self.func, chunk)(self.models[chunk].parameters())

    def before_forward(self, chunk: int) -> None:
        self.dispatch(chunk)
        self.dispatch(chunk + 1)


# --------------------------------------------------------------------------------------
# No pipelining
# --------------------------------------------------------------------------------------
def _single(value: Any, what: str) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"this schedule runs one model chunk; got {len(value)} {what} "
                             "(use the interleaved schedule for several chunks)")
        return value[0]
    return value


def _check_modes(forward_only: bool, collect_non_loss_data: bool) -> None:
    if collect_non_loss_data and not forward_only:
        raise ValueError("collect_non_loss_data=True needs forward_only=True: the collected "
                         "data is not a loss to differentiate")


def _finalize(hooks: TrainingHooks, models: List[Model],
              num_tokens: Optional[torch.Tensor]) -> None:
    if hooks.finalize_model_grads_func is None:
        return
    if num_tokens is None:
        hooks.finalize_model_grads_func(models)
    else:
        hooks.finalize_model_grads_func(models, num_tokens)


def _add_tokens(total: Optional[torch.Tensor], num_tokens) -> Optional[torch.Tensor]:
    if num_tokens is None:
        return total
    num_tokens = torch.as_tensor(num_tokens).detach()
    return num_tokens.clone() if total is None else total + num_tokens


def forward_backward_no_pipelining(*, forward_step_func: Callable, data_iterator: Any,
                                   model: Union[Model, List[Model]], num_microbatches: int,
                                   seq_length: Optional[int] = None,
                                   micro_batch_size: Optional[int] = None,
                                   decoder_seq_length: Optional[int] = None,
                                   forward_only: bool = False,
                                   collect_non_loss_data: bool = False,
                                   first_val_step: Optional[bool] = None,
                                   hooks: Optional[TrainingHooks] = None) -> List[Any]:
    """Gradient accumulation over micro-batches on a single stage (pp=1).

    All but the last micro-batch run inside ``hooks.no_sync_func()`` so data-parallel
    gradients are reduced once (with ``hooks.grad_sync_func`` set, all of them do and
    ``grad_sync_func(model.parameters())`` is called after the last backward).
    ``seq_length``, ``micro_batch_size``, ``decoder_seq_length`` and ``first_val_step``
    are accepted for the common contract and unused here.
    """
    model, data_iterator = _single(model, "models"), _single(data_iterator, "data iterators")
    _check_modes(forward_only, collect_non_loss_data)
    config = get_model_config(model)
    hooks = resolve_hooks(hooks, config)
    plan_lib.validate_schedule_args(1, num_microbatches)
    _ParamSync(hooks, [model], forward_only).dispatch(0)
    store: List[Any] = []
    grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
    with grad_mode:
        total_tokens = _accumulate(forward_step_func, data_iterator, model, num_microbatches,
                                   store, config, hooks, forward_only, collect_non_loss_data)
    if not forward_only:
        if hooks.grad_sync_func is not None:
            _for_chunk(hooks.grad_sync_func, 0)(model.parameters())
        _finalize(hooks, [model], total_tokens)
    return store


def _accumulate(forward_step_func, data_iterator, model, num_microbatches, store, config,
                hooks: TrainingHooks, forward_only, collect_non_loss_data
                ) -> Optional[torch.Tensor]:
    """Forward (and backward) of every micro-batch; returns the summed token count."""
    no_sync = _for_chunk(hooks.no_sync_func, 0) or contextlib.nullcontext
    # With grad_sync_func the last micro-batch stays in no_sync too; the hook syncs after.
    synced_last = num_microbatches - 1 if hooks.grad_sync_func is None else num_microbatches
    total_tokens = None
    for i in range(num_microbatches):
        with (no_sync() if i < synced_last and not forward_only else contextlib.nullcontext()):
            with hooks.timed("forward-compute"):
                output, tokens = forward_step(
                    forward_step_func, data_iterator, model, num_microbatches, None, store,
                    config, is_last_stage=True, collect_non_loss_data=collect_non_loss_data)
            total_tokens = _add_tokens(total_tokens, tokens)
            if not forward_only:
                with hooks.timed("backward-compute"):
                    backward_step(None, output, None, config, hooks=hooks)
    return total_tokens


# --------------------------------------------------------------------------------------
# Pipelined: walk a plan
# --------------------------------------------------------------------------------------
class _PipelineRun:
    """Executes one rank's :func:`.schedule_plan.build_plan` order.

    Tensors are keyed by ``(microbatch, chunk)``: ``inputs`` (received activations, None
    on the first virtual stage), ``outputs`` (activations or losses kept for backward),
    ``output_grads`` (received gradients) and ``input_grads`` (gradients to send).
    """

    def __init__(self, *, forward_step_func, data_iterators, models, num_microbatches,
                 config, hooks: TrainingHooks, comm: P2PCommunicator, tensor_shape,
                 forward_only, collect_non_loss_data, interleaved,
                 layout: plan_lib.StageLayout):
        self.forward_step_func, self.hooks = forward_step_func, hooks
        self.param_sync = _ParamSync(hooks, models, forward_only)
        self.data_iterators, self.models = data_iterators, models
        self.num_microbatches, self.config, self.comm = num_microbatches, config, comm
        self.tensor_shape, self.forward_only = tensor_shape, forward_only
        self.collect_non_loss_data, self.interleaved = collect_non_loss_data, interleaved
        self.inputs: Dict[Tuple[int, int], Optional[torch.Tensor]] = {}
        self.outputs: Dict[Tuple[int, int], torch.Tensor] = {}
        self.output_grads: Dict[Tuple[int, int], torch.Tensor] = {}
        self.input_grads: Dict[Tuple[int, int], torch.Tensor] = {}
        self.store: List[Any] = []
        self.total_tokens: Optional[torch.Tensor] = None
        # Zero-bubble: backwards between their B and W halves, and sends in flight.
        self.splits: Dict[Tuple[int, int], SplitBackward] = {}
        self.pending_sends: Optional[PendingSends] = None
        self.eager_sends = False
        # ZBV: where each chunk's neighbours live, and sends waited for only at the end.
        self.layout = layout
        self.in_flight: List[PendingSends] = []

    def _is_last_virtual(self, chunk: int) -> bool:
        return self.layout.is_last(self.comm.pp_rank, chunk)

    def _set_chunk(self, chunk: int) -> None:
        if self.interleaved:
            parallel_state.set_virtual_pipeline_model_parallel_rank(chunk)

    def forward(self, step: Step) -> None:
        key = (step.microbatch, step.chunk)
        self._set_chunk(step.chunk)
        input_tensor = self.inputs.get(key)
        self.param_sync.before_forward(step.chunk)
        with self.hooks.timed("forward-compute"):
            output, tokens = forward_step(
                self.forward_step_func, self.data_iterators[step.chunk],
                self.models[step.chunk], self.num_microbatches, input_tensor, self.store,
                self.config, is_last_stage=self._is_last_virtual(step.chunk),
                collect_non_loss_data=self.collect_non_loss_data)
        self.total_tokens = _add_tokens(self.total_tokens, tokens)
        if self.forward_only:
            self.inputs.pop(key, None)
            if not self._is_last_virtual(step.chunk):
                self.outputs[key] = output.detach()
        else:
            self.outputs[key] = output

    def backward(self, step: Step) -> None:
        key = (step.microbatch, step.chunk)
        self._set_chunk(step.chunk)
        with self.hooks.timed("backward-compute"):
            grad = backward_step(self.inputs.pop(key, None), self.outputs.pop(key),
                                 self.output_grads.pop(key, None), self.config,
                                 hooks=self.hooks)
        if grad is not None:
            self.input_grads[key] = grad

    def backward_input(self, step: Step) -> None:
        """B: the input gradient now; the weight half waits in ``splits`` for its W."""
        key = (step.microbatch, step.chunk)
        output, output_grad = self.outputs.pop(key), self.output_grads.pop(key, None)
        if output_grad is None and self.hooks.grad_scale_func is not None:
            output = self.hooks.grad_scale_func(output)
        split = SplitBackward(output, output_grad, self.inputs.pop(key, None))
        with self.hooks.timed("backward-compute"):
            grad = split.backward_input()
        self.splits[key] = split
        if grad is not None:
            self.input_grads[key] = grad

    def backward_weight(self, step: Step) -> None:
        with self.hooks.timed("backward-compute"):
            self.splits.pop((step.microbatch, step.chunk)).backward_weight()

    def handoff(self, step: Step) -> None:
        """ZBV's turn of the V: pass an output (or input gradient) to this rank's other
        chunk through memory, as a receive would have delivered it."""
        key = (step.microbatch, step.chunk)
        offset = 1 if step.op == plan_lib.HANDOFF_FORWARD else -1
        target = (step.microbatch, self.layout.neighbour(self.comm.pp_rank, step.chunk,
                                                         offset)[1])
        if step.op == plan_lib.HANDOFF_FORWARD:
            # A fresh leaf, like a received activation: B of the next chunk stops here.
            self.inputs[target] = self.outputs[key].detach().requires_grad_(
                not self.forward_only)
            if self.forward_only:
                self.outputs.pop(key)
        else:
            self.output_grads[target] = self.input_grads.pop(key)

    def exchange(self, batch: Sequence[Step]) -> None:
        ops = {step.op: (step.microbatch, step.chunk) for step in batch}
        assert len(ops) == len(batch), f"a batch holds one step per kind, got {batch}"
        if self.layout.v_shape:
            self._exchange_directed(batch)
            return
        send_next = self.outputs.get(ops.get(plan_lib.SEND_FORWARD))
        send_prev = self.input_grads.pop(ops.get(plan_lib.SEND_BACKWARD), None)
        with self.hooks.timed("pipeline-p2p"):
            if self.eager_sends:
                got_prev, got_next = self._exchange_eager(ops, send_next, send_prev)
            else:
                got_prev, got_next = self.comm.communicate(
                    tensor_send_next=send_next, tensor_send_prev=send_prev,
                    recv_prev=plan_lib.RECV_FORWARD in ops,
                    recv_next=plan_lib.RECV_BACKWARD in ops, tensor_shape=self.tensor_shape)
        if plan_lib.SEND_FORWARD in ops and not self.eager_sends:
            if self.forward_only:
                self.outputs.pop(ops[plan_lib.SEND_FORWARD])
            else:
                deallocate_output_tensor(send_next, self.config.deallocate_pipeline_outputs)
        if got_prev is not None:
            self.inputs[ops[plan_lib.RECV_FORWARD]] = got_prev
        if got_next is not None:
            self.output_grads[ops[plan_lib.RECV_BACKWARD]] = got_next

    def _exchange_eager(self, ops, send_next, send_prev):
        """Post this batch, wait for its receives and the previous batch's sends; an
        output is freed (``deallocate_pipeline_outputs``) once its send has completed."""
        finished = self.pending_sends
        got_prev, got_next, self.pending_sends = self.comm.communicate_eager_sends(
            tensor_send_next=send_next, tensor_send_prev=send_prev,
            recv_prev=plan_lib.RECV_FORWARD in ops, recv_next=plan_lib.RECV_BACKWARD in ops,
            tensor_shape=self.tensor_shape, pending_sends=finished)
        self._release_sent(finished)
        return got_prev, got_next

    def _exchange_directed(self, batch: Sequence[Step]) -> None:
        """ZBV: each message's peer follows its chunk's place in the V. Sends are waited
        for only when complete (checked here) or at the end: waiting for them earlier
        deadlocks ZBV for pp >= 3 (found with ``simulate``)."""
        rank = self.comm.pp_rank
        sends, send_keys, recvs, recv_keys = [], [], [], []
        for step in batch:
            key = (step.microbatch, step.chunk)
            forward = step.op in (plan_lib.SEND_FORWARD, plan_lib.RECV_FORWARD)
            kind = "activation" if forward else "gradient"
            if step.op in (plan_lib.SEND_FORWARD, plan_lib.SEND_BACKWARD):
                peer = self.layout.neighbour(rank, step.chunk, 1 if forward else -1)[0]
                tensor = (self.outputs[key] if forward else self.input_grads.pop(key))
                if self.forward_only and forward:
                    self.outputs.pop(key)   # the pending send keeps it alive
                sends.append((tensor, self._is_next(peer), kind))
            else:
                peer = self.layout.neighbour(rank, step.chunk, -1 if forward else 1)[0]
                recvs.append((self._is_next(peer), kind))
                recv_keys.append((key, forward))
        with self.hooks.timed("pipeline-p2p"):
            got, pending = self.comm.communicate_directed(sends=sends, recvs=recvs,
                                                          tensor_shape=self.tensor_shape)
        for (key, forward), tensor in zip(recv_keys, got):
            (self.inputs if forward else self.output_grads)[key] = tensor
        self.in_flight.append(pending)
        self._release_completed()

    def _is_next(self, peer: int) -> bool:
        """Whether pipeline rank ``peer`` is this rank's next (else its previous)."""
        return peer == (self.comm.pp_rank + 1) % self.comm.pp_size

    def _release_completed(self) -> None:
        still = []
        for sends in self.in_flight:
            if sends.completed():
                sends.wait()
                self._release_sent(sends)
            else:
                still.append(sends)
        self.in_flight = still

    def _release_sent(self, sends: Optional[PendingSends]) -> None:
        if sends is None:
            return
        for tensor in sends.tensors:
            # Activations (not gradients, which are fresh tensors) still back a graph.
            if any(tensor is out for out in self.outputs.values()):
                deallocate_output_tensor(tensor, self.config.deallocate_pipeline_outputs)

    def finish_sends(self) -> None:
        for sends in self.in_flight:
            sends.wait()
            self._release_sent(sends)
        self.in_flight = []
        if self.pending_sends is not None:
            self.pending_sends.wait()
            self._release_sent(self.pending_sends)
            self.pending_sends = None

    def run(self, steps: Sequence[Step], grad_sync: "_GradSync") -> None:
        batch: List[Step] = []
        for position, step in enumerate(list(steps) + [None]):
            if step is not None and step.op in plan_lib.COMM_OPS:
                batch.append(step)   # consecutive comm steps form one exchange
                continue
            if batch:
                self.exchange(batch)
                batch = []
            if step is None:
                break
            if step.op == plan_lib.FORWARD:
                self.forward(step)
            elif step.op in plan_lib.HANDOFF_OPS:
                self.handoff(step)
            elif step.op == plan_lib.BACKWARD_INPUT:
                self.backward_input(step)
            else:
                grad_sync.before_backward(position, step.chunk)
                if step.op == plan_lib.BACKWARD:
                    self.backward(step)
                else:
                    self.backward_weight(step)
                grad_sync.after_backward(position, step.chunk)
        self.finish_sends()
        leftovers = [d for d in (self.inputs, self.outputs, self.output_grads, self.input_grads,
                                 self.splits) if d]
        assert not leftovers, f"pipeline plan left tensors unconsumed: {leftovers}"


def _run_pipelined(*, forward_step_func, data_iterators, models, num_microbatches,
                   seq_length, micro_batch_size, forward_only, collect_non_loss_data,
                   interleaved, pp_group, p2p_timeout, hooks) -> List[Any]:
    _check_modes(forward_only, collect_non_loss_data)
    config = get_model_config(models[0])
    hooks = resolve_hooks(hooks, config)
    comm = P2PCommunicator(config, pp_group=pp_group, timeout=p2p_timeout)
    num_chunks = len(models)
    # Validate everything before the first message, identically on every rank.
    schedule = plan_lib.validate_pipeline_schedule(config.pipeline_schedule, comm.pp_size,
                                                   num_chunks)
    plan_lib.validate_schedule_args(comm.pp_size, num_microbatches,
                                    None if schedule == "zbv" else num_chunks,
                                    config.microbatch_group_size_per_vp_stage)
    if len(data_iterators) != num_chunks:
        raise ValueError(f"got {len(data_iterators)} data iterators for {num_chunks} model "
                         "chunks; pass one per chunk (None where a chunk reads no data)")
    tensor_shape = None
    if not config.variable_seq_lengths:
        tensor_shape = get_tensor_shape(seq_length=seq_length,
                                        micro_batch_size=micro_batch_size, config=config)
    zero_bubble = schedule == "zb-h1" and not forward_only
    if schedule in ("zb-h1", "zbv") and config.variable_seq_lengths:
        raise ValueError(f"--pipeline-schedule {schedule} needs fixed sequence lengths "
                         "(config.variable_seq_lengths=False)")
    if schedule == "zbv":
        _check_tag_matched_p2p(comm)
    # Forward-only runs (evaluation) use 1F1B's forward order whatever the schedule (ZBV:
    # its own, on its V of stages).
    steps = plan_lib.build_plan(comm.pp_rank, comm.pp_size, num_microbatches, num_chunks,
                                forward_only=forward_only,
                                schedule=schedule if zero_bubble or schedule == "zbv" else None)
    run = _PipelineRun(forward_step_func=forward_step_func, data_iterators=data_iterators,
                       models=models, num_microbatches=num_microbatches, config=config,
                       hooks=hooks, comm=comm, tensor_shape=tensor_shape, forward_only=forward_only,
                       collect_non_loss_data=collect_non_loss_data, interleaved=interleaved,
                       layout=plan_lib.stage_layout(schedule, comm.pp_size, num_chunks))
    run.eager_sends = zero_bubble
    grad_sync = _GradSync(hooks, models, steps)
    saved_chunk = parallel_state.get_virtual_pipeline_model_parallel_rank()
    try:
        if forward_only:
            with torch.no_grad():
                run.run(steps, grad_sync)
        else:
            grad_sync.start()
            try:
                run.run(steps, grad_sync)
            finally:
                grad_sync.finish()
    finally:
        if interleaved:
            parallel_state.set_virtual_pipeline_model_parallel_rank(saved_chunk)
    if not forward_only:
        _finalize(hooks, list(models), run.total_tokens)
    return run.store


def _check_tag_matched_p2p(comm: P2PCommunicator) -> None:
    """ZBV sends chunk 0's activations and chunk 1's gradients over the same link in
    orders the receiver does not follow; only tag-matched p2p (gloo) pairs them right.
    On NCCL, which pairs a link's messages in posting order, it would swap tensors."""
    backend = dist.get_backend(comm.group)
    if backend != "gloo":
        raise ValueError(f"--pipeline-schedule zbv needs gloo p2p (tag-matched messages); "
                         f"the pipeline group uses {backend}: use --pipeline-schedule zb-h1 "
                         "or interleaved-1f1b")


def forward_backward_pipelining_without_interleaving(
        *, forward_step_func: Callable, data_iterator: Any, model: Union[Model, List[Model]],
        num_microbatches: int, seq_length: int, micro_batch_size: int,
        decoder_seq_length: Optional[int] = None, forward_only: bool = False,
        collect_non_loss_data: bool = False, first_val_step: Optional[bool] = None,
        pp_group: Optional[dist.ProcessGroup] = None,
        p2p_timeout: Optional[datetime.timedelta] = None,
        hooks: Optional[TrainingHooks] = None) -> List[Any]:
    """1F1B: ``pp - rank - 1`` warm-up forwards, then one forward / one backward, then
    the remaining backwards. At most ``pp - rank`` micro-batches' activations are alive.

    ``pp_group`` overrides the default pipeline group; ``p2p_timeout`` bounds each
    exchange (default :data:`.p2p_communication.DEFAULT_P2P_TIMEOUT`); ``hooks`` as in
    the module docstring.
    ``decoder_seq_length`` and ``first_val_step`` are accepted and unused.
    """
    model, data_iterator = _single(model, "models"), _single(data_iterator, "data iterators")
    return _run_pipelined(forward_step_func=forward_step_func, data_iterators=[data_iterator],
                          models=[model], num_microbatches=num_microbatches,
                          seq_length=seq_length, micro_batch_size=micro_batch_size,
                          forward_only=forward_only, collect_non_loss_data=collect_non_loss_data,
                          interleaved=False, pp_group=pp_group, p2p_timeout=p2p_timeout,
                          hooks=hooks)


def forward_backward_pipelining_with_interleaving(
        *, forward_step_func: Callable, data_iterator: Any, model: List[Model],
        num_microbatches: int, seq_length: int, micro_batch_size: int,
        decoder_seq_length: Optional[int] = None, forward_only: bool = False,
        collect_non_loss_data: bool = False, first_val_step: Optional[bool] = None,
        pp_group: Optional[dist.ProcessGroup] = None,
        p2p_timeout: Optional[datetime.timedelta] = None,
        hooks: Optional[TrainingHooks] = None) -> List[Any]:
    """Interleaved 1F1B over ``len(model)`` chunks per rank (virtual stages).

    ``model`` and ``data_iterator`` are lists, one entry per chunk; chunk ``c`` of rank
    ``r`` is virtual stage ``c * pp + r``. Micro-batches go through the chunks in groups
    of ``pp``, so ``num_microbatches`` must be a multiple of ``pp``. The virtual pipeline
    rank in ``parallel_state`` is set to the running chunk (and restored afterwards).
    """
    if not isinstance(model, (list, tuple)):
        raise ValueError("the interleaved schedule needs model as a list of chunks")
    if not isinstance(data_iterator, (list, tuple)):
        raise ValueError("the interleaved schedule needs one data iterator per model chunk")
    return _run_pipelined(forward_step_func=forward_step_func,
                          data_iterators=list(data_iterator), models=list(model),
                          num_microbatches=num_microbatches, seq_length=seq_length,
                          micro_batch_size=micro_batch_size, forward_only=forward_only,
                          collect_non_loss_data=collect_non_loss_data, interleaved=True,
                          pp_group=pp_group, p2p_timeout=p2p_timeout, hooks=hooks)
