"""Linear and embedding layers whose weights are split over the tensor-parallel group.

``ColumnParallelLinear``  Y = X A with A = [A_1 ... A_t] split by columns (output
features); rank i computes Y_i = X A_i. Weight shard ``[out/tp, in]``.

``RowParallelLinear``     Y = X A with A split by rows (input features) and X split by
columns; rank i computes X_i A_i and the partial products are summed. Weight shard
``[out, in/tp]``.

``VocabParallelEmbedding`` rows of the embedding table split over tp; each rank looks up
the ids in its range, the others contribute zeros, and an all-reduce (or, under sequence
parallelism, a reduce-scatter) combines them.

Initialization is layout-independent: the full ("master") weight is drawn with
``init_method`` from the default generator, which is identical on every tp rank, and each
rank keeps its shard. So a tp=2 layer built from a seed equals the tp=1 layer from that seed.

Sequence parallelism (``config.sequence_parallel``): activations outside the tp region
are ``[s/tp, b, h]``. ColumnParallelLinear all-gathers its input along the sequence (and
reduce-scatters the input gradient); RowParallelLinear reduce-scatters its output.

The linear autograd function overlaps the input-gradient collective with the weight-
gradient matmul: the all-reduce (or reduce-scatter) is started asynchronously, the weight
gradient computed, then the collective awaited.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parameter import Parameter

from megacore import collectives, device, parallel_state
from megacore.model_parallel_config import ModelParallelConfig
from megacore.tensor_parallel import weight_grad_phase as wgrad_phase
from megacore.tensor_parallel.mappings import (
    all_gather_along_dim,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "LinearWithGradAccumulationAndAsyncCommunication",
    "linear_with_grad_accumulation_and_async_allreduce",
    "set_tensor_model_parallel_attributes",
    "copy_tensor_model_parallel_attributes",
    "param_is_not_tensor_parallel_duplicate",
    "set_defaults_if_not_set_tensor_model_parallel_attributes",
]

_TP_ATTRIBUTE_DEFAULTS = {"tensor_model_parallel": False, "partition_dim": -1,
                          "partition_stride": 1}


def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int,
                                         stride: int) -> None:
    """Mark a parameter as split over tp along ``dim`` (read by optimizers, checkpoints)."""
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride


def set_defaults_if_not_set_tensor_model_parallel_attributes(tensor: torch.Tensor) -> None:
    for name, value in _TP_ATTRIBUTE_DEFAULTS.items():
        if not hasattr(tensor, name):
            setattr(tensor, name, value)


def copy_tensor_model_parallel_attributes(dst: torch.Tensor, src: torch.Tensor) -> None:
    for name in _TP_ATTRIBUTE_DEFAULTS:
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor,
                                           tp_rank: Optional[int] = None) -> bool:
    """True for a tp-split param, or for a replicated one on tp rank 0 (count it once)."""
    if getattr(param, "tensor_model_parallel", False):
        return True
    if tp_rank is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return tp_rank == 0


def _shard_master_weight(master: torch.Tensor, dim: int, stride: int, rank: int,
                         world: int) -> torch.Tensor:
    """This rank's shard of ``master`` along ``dim``.

    With ``stride`` s the dim is cut into ``world * s`` equal blocks and rank r keeps blocks
    r, r + world, ... (in order): for a fused weight made of s stacked matrices, every rank
    gets its slice of each. Example: dim of 8 rows, world 2, stride 2 -> blocks of 2 rows;
    rank 0 keeps rows [0,1,4,5], rank 1 rows [2,3,6,7].
    """
    if world == 1:
        return master
    blocks = master.chunk(world * stride, dim=dim)
    return torch.cat(blocks[rank::world], dim=dim).contiguous()


def _init_sharded_weight(weight: Parameter, full_shape: Tuple[int, int], dim: int, stride: int,
                         init_method: Callable, config: ModelParallelConfig,
                         rank: int, world: int) -> None:
    """Draw the master weight on the CPU from the default generator and keep our shard."""
    set_tensor_model_parallel_attributes(weight, True, dim, stride)
    if not config.perform_initialization:
        return
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    with torch.no_grad():
        weight.copy_(_shard_master_weight(master, dim, stride, rank, world))


class LinearWithGradAccumulationAndAsyncCommunication(torch.autograd.Function):
    """``y = x W^T + b`` with the tp collectives of the input gradient fused in.

    forward: (sequence parallel: all-gather x along dim 0) -> matmul.
    backward: dgrad = dy W; start all-reduce of dgrad over tp (or reduce-scatter under
    sequence parallelism) asynchronously; compute wgrad (into ``weight.main_grad`` when
    ``gradient_accumulation_fusion``); wait for the collective.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                sequence_parallel, group):
        ctx.save_for_backward(x, weight)
        ctx.use_bias = bias is not None
        ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.group = group
        if sequence_parallel:
            x = all_gather_along_dim(x, 0, group)  # [s/tp, b, h] -> [s, b, h]
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        # Under a split backward (zero-bubble schedules) compute only this phase's half.
        phase = wgrad_phase.current_phase()
        wants_weight = phase != wgrad_phase.INPUT_GRAD
        # The sequence-parallel gather comes first, before the dgrad collective starts
        # (one collective in flight per group at a time).
        total_x = _gathered_input(ctx) if wants_weight else None
        grad_input = handle = sub = None
        if phase != wgrad_phase.WEIGHT_GRAD:
            grad_input, handle, sub = _input_grad_start(ctx, grad_output)
        grad_weight = grad_bias = None
        if wants_weight:
            grad_weight, grad_bias = _weight_and_bias_grads(ctx, grad_output, total_x)
        if handle is not None:
            handle.wait()
        if sub is not None:
            grad_input = sub
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _input_grad_start(ctx, grad_output):
    """dgrad = dy W, with its tp collective started asynchronously (overlaps wgrad)."""
    x, weight = ctx.saved_tensors
    grad_input = grad_output.matmul(weight)
    handle = sub = None
    if ctx.sequence_parallel:
        # [s, b, h] -> reduce-scatter -> [s/tp, b, h], overlapped with wgrad.
        grad_input = grad_input.contiguous()
        sub = torch.empty_like(x)
        handle = collectives.reduce_scatter_single(sub, grad_input, group=ctx.group,
                                                   async_op=True)
    elif ctx.allreduce_dgrad:
        grad_input = grad_input.contiguous()
        handle = dist.all_reduce(grad_input, group=ctx.group, async_op=True)
    return grad_input, handle, sub


def _gathered_input(ctx):
    x, _ = ctx.saved_tensors
    if not ctx.sequence_parallel:
        return x
    # Recompute the gathered input instead of saving it: tp times less memory.
    return all_gather_along_dim(x, 0, ctx.group)  # [s/tp, b, h] -> [s, b, h]


def _weight_and_bias_grads(ctx, grad_output, total_x):
    _, weight = ctx.saved_tensors
    grad_out_2d = grad_output.reshape(-1, grad_output.size(-1))
    x_2d = total_x.reshape(-1, total_x.size(-1))
    grad_weight = _weight_grad(weight, grad_out_2d, x_2d, ctx.gradient_accumulation_fusion)
    grad_bias = grad_out_2d.sum(dim=0) if ctx.use_bias else None
    return grad_weight, grad_bias


def _weight_grad(weight, grad_out_2d, x_2d, accumulate_into_main_grad):
    if not accumulate_into_main_grad:
        return grad_out_2d.t().matmul(x_2d)
    # Add straight into the fp32 DDP buffer; hand autograd a zero tensor so hooks still run,
    # and tell DDP the real gradient is already in main_grad.
    main_grad = weight.main_grad
    main_grad.add_(grad_out_2d.t().matmul(x_2d).to(main_grad.dtype))
    weight.grad_added_to_main_grad = True
    return torch.zeros_like(weight)


def _linear(x, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
            group):
    """The autograd function when it has work to do, else plain ``F.linear``.

    Without sequence parallelism, weight-gradient fusion or an input-gradient all-reduce
    (tp=1, or no gradients at all as in inference) the function is ``F.linear``; calling
    that directly saves the custom-function dispatch, ~40 us per call on CPU, which is a
    large part of a one-token decode step.
    """
    needs_grad_work = torch.is_grad_enabled() and (gradient_accumulation_fusion or allreduce_dgrad)
    if not sequence_parallel and not needs_grad_work:
        return F.linear(x, weight, bias)
    return LinearWithGradAccumulationAndAsyncCommunication.apply(
        x, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, group)


def linear_with_grad_accumulation_and_async_allreduce(
        x, weight, bias, gradient_accumulation_fusion=False, allreduce_dgrad=False,
        sequence_parallel=False, group=None):
    """Functional form of :class:`LinearWithGradAccumulationAndAsyncCommunication`."""
    if group is None and (allreduce_dgrad or sequence_parallel):
        group = parallel_state.get_tensor_model_parallel_group()
    return _linear(x, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                   sequence_parallel, group)


def _group_and_size(tp_group, is_expert):
    if tp_group is None:
        tp_group = (parallel_state.get_expert_tensor_parallel_group() if is_expert
                    else parallel_state.get_tensor_model_parallel_group())
    return tp_group, dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size "
                         f"({denominator})")
    return numerator // denominator


class ColumnParallelLinear(torch.nn.Module):
    """Linear layer split over tp along the output features.

    Args:
        input_size: in features ``h``.
        output_size: out features ``n`` (divisible by tp); this rank holds ``n/tp``.
        config: parallel and precision settings.
        init_method: fills the full ``[n, h]`` master weight.
        bias: add a bias (split like the output).
        gather_output: all-gather the output to ``[.., n]``; else it stays ``[.., n/tp]``.
        stride: blocks per rank for fused weights (see ``_shard_master_weight``).
        skip_bias_add: return the bias instead of adding it (for fusion by the caller).
        skip_weight_param_allocation: no weight parameter; ``forward`` must get ``weight``
            (used for an output layer tied to the word embedding).
        is_expert: an MoE expert layer (expert-tp group, ``allreduce=False`` params).
        tp_group: explicit group; default the (expert) tensor-parallel group.

    forward(x ``[s, b, h]`` or ``[s/tp, b, h]`` under sequence parallelism) returns
    ``(output [s, b, n/tp], bias or None)``.
    """

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig,
                 init_method: Callable, bias: bool = True, gather_output: bool = False,
                 stride: int = 1, keep_master_weight_for_test: bool = False,
                 skip_bias_add: bool = False, skip_weight_param_allocation: bool = False,
                 is_expert: bool = False, tp_group: Optional[dist.ProcessGroup] = None,
                 disable_grad_reduce: bool = False):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.config = config
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.is_expert = is_expert
        self.disable_grad_reduce = disable_grad_reduce
        self.tp_group, self.tp_size, self.tp_rank = _group_and_size(tp_group, is_expert)
        self.output_size_per_partition = _divide(output_size, self.tp_size,
                                                 "ColumnParallelLinear output_size")
        self.sequence_parallel = config.sequence_parallel and self.tp_size > 1
        if self.sequence_parallel and is_expert:
            raise ValueError("expert layers receive tokens already gathered: "
                             "sequence_parallel does not apply inside them")
        self.gradient_accumulation_fusion = config.gradient_accumulation_fusion
        dev = device.current_device()
        if skip_weight_param_allocation:
            self.weight = None
        else:
            self.weight = Parameter(torch.empty(self.output_size_per_partition, input_size,
                                                dtype=config.params_dtype, device=dev))
            _init_sharded_weight(self.weight, (output_size, input_size), 0, stride,
                                 init_method, config, self.tp_rank, self.tp_size)
            if is_expert:
                self.weight.allreduce = False
        if bias:
            self.bias = Parameter(torch.zeros(self.output_size_per_partition,
                                              dtype=config.params_dtype, device=dev))
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
            if is_expert:
                self.bias.allreduce = False
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        if weight is None:
            if self.weight is None:
                raise RuntimeError("weight was not allocated (skip_weight_param_allocation) "
                                   "and none was passed to forward")
            weight = self.weight
        elif weight.shape != (self.output_size_per_partition, self.input_size):
            raise ValueError(f"weight passed to forward has shape {tuple(weight.shape)}, "
                             f"expected {(self.output_size_per_partition, self.input_size)}")
        bias = self.bias if not self.skip_bias_add else None
        allreduce_dgrad = self.tp_size > 1 and not self.sequence_parallel \
            and not self.disable_grad_reduce
        output = _linear(
            input_, weight, bias,
            self.gradient_accumulation_fusion and hasattr(weight, "main_grad"),
            allreduce_dgrad, self.sequence_parallel, self.tp_group)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and self.tp_size > 1:
            output = gather_from_tensor_model_parallel_region(output, self.tp_group)
        return output, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(torch.nn.Module):
    """Linear layer split over tp along the input features.

    Args:
        input_size: in features ``h`` (divisible by tp); this rank holds ``h/tp``.
        output_size: out features ``n``.
        config: parallel and precision settings.
        init_method: fills the full ``[n, h]`` master weight.
        bias: add a bias (replicated; with sequence parallelism its grad is all-reduced
            over tp by ``finalize_model_grads``, hence ``bias.sequence_parallel``).
        input_is_parallel: the input is already ``[.., h/tp]``; else it is split here.
        skip_bias_add: return the bias instead of adding it.
        is_expert: an MoE expert layer (expert-tp group, ``allreduce=False`` params).
        tp_group: explicit group; default the (expert) tensor-parallel group.

    forward(x ``[s, b, h/tp]``) returns ``(output, bias or None)`` with output
    ``[s, b, n]``, or ``[s/tp, b, n]`` under sequence parallelism.
    """

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig,
                 init_method: Callable, bias: bool, input_is_parallel: bool,
                 skip_bias_add: bool = False, stride: int = 1,
                 keep_master_weight_for_test: bool = False, is_expert: bool = False,
                 tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.config = config
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.is_expert = is_expert
        self.tp_group, self.tp_size, self.tp_rank = _group_and_size(tp_group, is_expert)
        self.input_size_per_partition = _divide(input_size, self.tp_size,
                                                "RowParallelLinear input_size")
        self.sequence_parallel = config.sequence_parallel and self.tp_size > 1
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("with sequence_parallel, RowParallelLinear needs "
                             "input_is_parallel=True")
        if self.sequence_parallel and is_expert:
            raise ValueError("expert layers do not use sequence_parallel inside them")
        self.gradient_accumulation_fusion = config.gradient_accumulation_fusion
        dev = device.current_device()
        self.weight = Parameter(torch.empty(output_size, self.input_size_per_partition,
                                            dtype=config.params_dtype, device=dev))
        _init_sharded_weight(self.weight, (output_size, input_size), 1, stride, init_method,
                             config, self.tp_rank, self.tp_size)
        if is_expert:
            self.weight.allreduce = False
        if bias:
            self.bias = Parameter(torch.zeros(output_size, dtype=config.params_dtype, device=dev))
            set_tensor_model_parallel_attributes(self.bias, False, -1, 1)
            self.bias.sequence_parallel = self.sequence_parallel
            if is_expert:
                self.bias.allreduce = False
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor):
        if not self.input_is_parallel and self.tp_size > 1:
            input_ = scatter_to_tensor_model_parallel_region(input_, self.tp_group)
        partial = _linear(
            input_, self.weight, None,
            self.gradient_accumulation_fusion and hasattr(self.weight, "main_grad"), False, False,
            self.tp_group)
        if self.tp_size == 1:
            output = partial
        elif self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        else:
            output = reduce_from_tensor_model_parallel_region(partial, self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        if self.bias is not None:
            output = output + self.bias
        return output, None


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding table split over tp by rows (vocabulary entries).

    Args:
        num_embeddings: vocabulary size, divisible by tp (pad it: see
            ``megacore.tokenizers`` padded vocab sizes).
        embedding_dim: hidden size ``h``.
        init_method: fills the full ``[vocab, h]`` master table.
        config: parallel and precision settings.
        reduce_scatter_embeddings: combine partial lookups with a reduce-scatter along the
            sequence (sequence parallelism; input must be ``[s, b]``-ordered, i.e. the
            caller transposes ``[b, s]`` ids first) instead of an all-reduce.
        tp_group: explicit group; default the tensor-parallel group.

    forward(ids ``[b, s]``) returns ``[b, s, h]`` (or, with ``reduce_scatter_embeddings``,
    ids ``[s, b]`` give ``[s/tp, b, h]``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: Callable,
                 config: ModelParallelConfig, reduce_scatter_embeddings: bool = False,
                 tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        self.tp_group, self.tp_size, self.tp_rank = _group_and_size(tp_group, False)
        per_partition = _divide(num_embeddings, self.tp_size, "VocabParallelEmbedding "
                                "num_embeddings (pad the vocabulary)")
        self.vocab_start_index = self.tp_rank * per_partition
        self.vocab_end_index = self.vocab_start_index + per_partition
        self.num_embeddings_per_partition = per_partition
        self.weight = Parameter(torch.empty(per_partition, embedding_dim,
                                            dtype=config.params_dtype,
                                            device=device.current_device()))
        _init_sharded_weight(self.weight, (num_embeddings, embedding_dim), 0, 1, init_method,
                             config, self.tp_rank, self.tp_size)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local_ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        else:
            local_ids = input_
        output = F.embedding(local_ids, self.weight)
        if self.tp_size > 1:
            output = output.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(output, self.tp_group)
        return reduce_from_tensor_model_parallel_region(output, self.tp_group)

