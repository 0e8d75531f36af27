"""``ModelParallelConfig``: how a model is split and run, shared by every parallel layer.

Parallel layers, pipeline schedules and DDP read this config; ``TransformerConfig``
extends it with the model's shape. Field names are Megatron-Core's, so configs written
for it port unchanged. The hook fields (``finalize_model_grads_func``, ``no_sync_func`` ...)
are deprecated: hooks are arguments of the schedules
(``megacore.pipeline_parallel.TrainingHooks``), not part of a model's configuration.
Setting one warns; the schedules still call them until they are removed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ContextManager, Optional

import torch

from megacore.config_error import FieldError
from megacore.deprecation import warn_deprecated

__all__ = ["ModelParallelConfig"]

HOOKS_DEPRECATED_SINCE = "0.2.0"
"""Version since which the hook fields below are deprecated."""

HOOKS_REMOVED_IN = "0.4.0"
"""Version that removes them (two minor versions: ``deprecation.MIN_MINOR_VERSIONS``)."""

DEPRECATED_HOOK_FIELDS = ("timers", "finalize_model_grads_func", "grad_scale_func",
                          "no_sync_func", "grad_sync_func", "param_sync_func")
"""Fields that moved to ``megacore.pipeline_parallel.TrainingHooks``."""


@dataclasses.dataclass
class ModelParallelConfig:
    """Parallel degrees and precision (and, deprecated, the hooks the schedules call)."""

    # -- degrees ------------------------------------------------------------------------
    tensor_model_parallel_size: int = 1
    """Ranks that split every weight matrix (Megatron tensor parallelism)."""

    pipeline_model_parallel_size: int = 1
    """Ranks that split the layers into consecutive stages."""

    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank for the interleaved schedule (None: not interleaved)."""

    sequence_parallel: bool = False
    """Split activations outside the tensor-parallel region along the sequence over tp
    ranks (Korthikanti et al. 2022): saves activation memory at the same communication."""

    context_parallel_size: int = 1
    """Ranks that split the sequence inside attention (ring attention)."""

    expert_model_parallel_size: int = 1
    """Ranks that split the experts of MoE layers."""

    expert_tensor_parallel_size: Optional[int] = None
    """Tensor parallelism inside each expert (None: same as tensor_model_parallel_size)."""

    # -- initialization and precision ---------------------------------------------------
    perform_initialization: bool = True
    """Run init methods on new parameters; turn off when weights are loaded right after."""

    use_cpu_initialization: bool = False
    """Initialize master weights on the CPU (always the case on CPU runs)."""

    fp16: bool = False
    """Parameters and activations in float16 (with a loss scaler in the optimizer)."""

    bf16: bool = False
    """Parameters and activations in bfloat16."""

    params_dtype: torch.dtype = torch.float32
    """dtype of parameters as created."""

    deterministic_mode: bool = False
    """Prefer deterministic kernels so two identical runs give bitwise-equal results."""

    gradient_accumulation_fusion: bool = False
    """Linear layers add weight gradients straight into ``param.main_grad`` (the DDP
    buffer) instead of producing ``param.grad``; saves one buffer and one add per step."""

    # -- pipeline -----------------------------------------------------------------------
    pipeline_dtype: Optional[torch.dtype] = None
    """dtype of activations sent between pipeline stages (None: params_dtype)."""

    variable_seq_lengths: bool = False
    """Exchange tensor shapes between stages every micro-batch (sequence lengths vary)."""

    batch_p2p_comm: bool = True
    """Group each step's sends and receives into one batch_isend_irecv call."""

    deallocate_pipeline_outputs: bool = False
    """Free a stage's output data once sent, keeping only its autograd graph."""

    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Layers on the first stage when splitting unevenly (None: even split)."""

    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Layers on the last stage when splitting unevenly (None: even split)."""

    pipeline_schedule: Optional[str] = None
    """Pipeline schedule: ``"1f1b"``, ``"interleaved-1f1b"``, ``"zb-h1"`` or ``"zbv"``
    (None: 1F1B, interleaved when the model has several chunks per rank). ``zb-h1`` (zero
    bubble) splits each backward into the input gradient, sent on at once, and the weight
    gradients, run in what would be pipeline bubbles: about a third of 1F1B's bubble
    for the same activation memory. ``zbv`` also splits them, over exactly two chunks per
    rank placed in a V (rank ``r`` holds virtual stages ``r`` and ``2 pp - 1 - r``; the
    loss is on rank 0): about half of ZB-H1's bubble for ``m >= 2 pp``. Both need fixed
    sequence lengths; ``zbv`` needs gloo (tag-matched p2p)."""

    microbatch_group_size_per_vp_stage: Optional[int] = None
    """Micro-batches run on one model chunk before moving to the next in the interleaved
    schedule (None: pipeline_model_parallel_size)."""

    # -- deprecated: hooks are the schedules' ``hooks=TrainingHooks(...)`` argument -----
    timers: Optional[Callable] = None
    """Deprecated (use ``TrainingHooks.timers``): timer factory for the schedules."""

    finalize_model_grads_func: Optional[Callable] = None
    """Deprecated (use ``TrainingHooks.finalize_model_grads_func``): called by the
    schedule after the last backward (DDP grad sync, tied embeddings)."""

    grad_scale_func: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    """Deprecated (use ``TrainingHooks.grad_scale_func``): scales the loss before backward."""

    no_sync_func: Optional[Callable[[], ContextManager]] = None
    """Deprecated (use ``TrainingHooks.no_sync_func``): defers data-parallel gradient
    reduction during accumulation."""

    grad_sync_func: Optional[Callable] = None
    """Deprecated (use ``TrainingHooks.grad_sync_func``): starts a chunk's gradient
    reduction."""

    param_sync_func: Optional[Callable] = None
    """Deprecated (use ``TrainingHooks.param_sync_func``): starts a chunk's parameter
    all-gather (distributed optimizer)."""

    def __setattr__(self, name, value):
        # Also reached from the generated __init__, so a constructor argument warns too.
        if value is not None and name in DEPRECATED_HOOK_FIELDS:
            warn_deprecated(f"ModelParallelConfig.{name}", since=HOOKS_DEPRECATED_SINCE,
                            removed_in=HOOKS_REMOVED_IN,
                            alternative="megacore.pipeline_parallel.TrainingHooks (the "
                                        "schedules' hooks= argument)")
        super().__setattr__(name, value)

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size", "expert_model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FieldError(f"{name} must be a positive integer, got {value!r}", name)
        if self.fp16 and self.bf16:
            raise FieldError("fp16 and bf16 are mutually exclusive; set at most one",
                             "fp16", "bf16")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            # Megatron silently turns this off; we keep the config honest instead.
            raise FieldError("sequence_parallel=True needs tensor_model_parallel_size > 1",
                             "sequence_parallel", "tensor_model_parallel_size")
        if self.expert_tensor_parallel_size is None:
            self.expert_tensor_parallel_size = self.tensor_model_parallel_size
        if self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype
