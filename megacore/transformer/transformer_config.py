"""``TransformerConfig``: the shape and numerics of a transformer, on top of its parallel split.

Every module in :mod:`megacore.transformer` and :mod:`megacore.models` receives one of
these. Field names are Megatron-Core's so configs port unchanged; derived defaults
(``ffn_hidden_size``, ``kv_channels``, ``num_query_groups``, the init methods) are filled
in ``__post_init__``, which also rejects inconsistent combinations with a message naming
the fields. MoE fields (``num_moe_experts``, ``moe_router_topk`` ...) come from
:class:`~megacore.transformer.moe_config.MoEConfig`, whose checks run after these.

Shape legend used across the package: ``s`` sequence, ``b`` micro-batch, ``h`` hidden,
``np`` attention heads, ``ng`` query groups (key/value heads), ``hn`` head dim
(``kv_channels``), ``tp`` tensor-parallel size.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from megacore.config_error import FieldError
from megacore.model_parallel_config import ModelParallelConfig
from megacore.transformer.enums import AttnBackend
from megacore.transformer.initialization import (
    init_method_normal,
    scaled_init_method_normal,
)
from megacore.transformer.mla_config import MLAConfig
from megacore.transformer.moe_config import MoEConfig

__all__ = ["TransformerConfig"]

_NORMALIZATIONS = ("LayerNorm", "RMSNorm")
_RECOMPUTE_GRANULARITIES = (None, "full", "selective")
_RECOMPUTE_METHODS = (None, "uniform", "block")


@dataclasses.dataclass
class TransformerConfig(MLAConfig, MoEConfig, ModelParallelConfig):
    """Architecture, regularization, initialization and recompute settings."""

    # -- shape --------------------------------------------------------------------------
    num_layers: int = 0
    """Transformer layers in the whole model (all pipeline stages together)."""

    hidden_size: int = 0
    """Width ``h`` of the residual stream."""

    num_attention_heads: int = 0
    """Query heads ``np``; divisible by tensor_model_parallel_size."""

    num_query_groups: Optional[int] = None
    """Key/value heads ``ng`` for grouped-query attention (None: ``np``, i.e. multi-head;
    1: multi-query). ``np`` must be divisible by it. When ``ng < tp`` each key/value head
    is replicated on the ``tp / ng`` ranks whose query heads use it."""

    ffn_hidden_size: Optional[int] = None
    """Inner width of the MLP (None: ``4 * hidden_size``)."""

    kv_channels: Optional[int] = None
    """Head dim ``hn`` (None: ``hidden_size // num_attention_heads``)."""

    # -- regularization -----------------------------------------------------------------
    hidden_dropout: float = 0.1
    """Dropout on the attention and MLP outputs before they join the residual, and on the
    embeddings."""

    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""

    # -- residual and normalization -----------------------------------------------------
    fp32_residual_connection: bool = False
    """Keep the residual stream in float32 when parameters are 16-bit."""

    apply_residual_connection_post_layernorm: bool = False
    """Use the normalized input as the residual (original BERT) instead of the raw input."""

    layernorm_epsilon: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""

    normalization: str = "LayerNorm"
    """``"LayerNorm"`` (GPT) or ``"RMSNorm"`` (Llama)."""

    layernorm_zero_centered_gamma: bool = False
    """Store the norm's scale as ``gamma - 1`` (initialized to 0) and apply ``1 + gamma``
    (Megatron's ``--apply-layernorm-1p``): weight decay then pulls the scale toward 1
    rather than 0. Applies to LayerNorm and RMSNorm."""

    qk_layernorm: bool = False
    """Normalize queries and keys per head before attention (stabilizes large models)."""

    # -- linear layers ------------------------------------------------------------------
    add_bias_linear: bool = True
    """Biases on the attention output projection and the MLP linears."""

    add_qkv_bias: bool = False
    """Bias on the fused query/key/value projection even when ``add_bias_linear`` is off
    (Qwen-style); with ``add_bias_linear`` on the QKV projection always has a bias."""

    gated_linear_unit: bool = False
    """MLP computes ``act(x W_gate) * (x W_up)`` (SwiGLU with ``activation_func=F.silu``)."""

    activation_func: Callable[[torch.Tensor], torch.Tensor] = F.gelu
    """MLP nonlinearity."""

    # -- initialization -----------------------------------------------------------------
    init_method_std: float = 0.02
    """Standard deviation of the default init methods."""

    init_method: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    """Init for weights that read the residual (QKV, fc1, embeddings); None: N(0, std^2)."""

    output_layer_init_method: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    """Init for weights that write the residual (attention proj, fc2); None:
    N(0, (std / sqrt(2 * num_layers))^2)."""

    # -- attention numerics -------------------------------------------------------------
    apply_query_key_layer_scaling: bool = False
    """Divide scores by the layer number before softmax and multiply back inside it
    (Megatron's fp16 overflow guard); needs attention_softmax_in_fp32."""

    attention_softmax_in_fp32: bool = True
    """Compute the attention softmax in float32 for 16-bit models."""

    softmax_scale: Optional[float] = None
    """Scale of ``q k^T`` (None: ``1 / sqrt(kv_channels)``)."""

    attention_backend: AttnBackend = AttnBackend.auto
    """Kernel for core attention: ``auto`` (default) torch's scaled_dot_product_attention
    with in-kernel dropout (the fastest kernel for the device and mask), ``flash`` /
    ``fused`` only those fused kernels (an error where they cannot run), ``unfused`` /
    ``local`` the explicit matmul-softmax path (see ``AttnBackend``)."""

    layout_independent_attention_dropout: bool = False
    """Draw the attention-dropout mask as a hash of (seed, batch, global head, query
    position, key position) instead of in the fused kernel, so every tp/cp/pp layout
    drops exactly the same elements as the single process. Cost: attention dropout then
    runs on the explicit path, materialising the ``[b, np/tp, s, s]`` scores,
    probabilities and an int64 hash per layer (``[b, np/tp, s/cp, s/cp]`` per ring step
    under cp), several times slower and larger than the fused kernel. Turn on to compare
    layouts bit for bit with dropout on; leave off to train."""

    window_size: Optional[Tuple[int, int]] = None
    """Sliding-window attention ``(left, right)``: the query at position ``i`` attends keys
    ``i - left .. i + right`` (causal models use ``right = 0``; ``-1`` means unbounded on
    that side). Mistral's ``sliding_window = w`` (w keys including the query's own) is
    ``(w - 1, 0)``. None: full (causal) attention. Not supported with context parallelism."""

    rotary_interleaved: bool = False
    """Rotate interleaved pairs (x0, x1), (x2, x3) ... (GPT-J) instead of the two halves
    of each head (GPT-NeoX, Llama)."""

    # -- fusions ------------------------------------------------------------------------
    bias_activation_fusion: bool = False
    """Megatron's switch for its jit-fused bias+activation kernels. Accepted for config
    compatibility: the torch path computes the same function either way."""

    masked_softmax_fusion: bool = False
    """Megatron's fused scale-mask-softmax CUDA kernel. Accepted for config
    compatibility: megacore's kernels are chosen by ``attention_backend``, so this flag
    does not change the computation."""

    persist_layer_norm: bool = False
    """Megatron's switch for Apex's persistent LayerNorm kernel. Accepted for config
    compatibility: megacore picks Apex's fused LayerNorm through the layer spec (when Apex
    is importable on CUDA), so this flag does not change the computation."""

    transformer_impl: str = "local"
    """``"local"``: megacore's torch modules (every device). ``"transformer_engine"``:
    attention and linear layers from NVIDIA Transformer Engine (norms fused into the
    following linear, TE's fused attention), CUDA only; checkpoints keep the local names.
    (Megatron-Core's default is ``transformer_engine``; megacore's is ``local``.)"""

    compile_layers: bool = False
    """``torch.compile`` each transformer layer (TorchInductor) when it is built. The
    first step pays the compilation (100-200 s on a loaded 2-core CPU). Losses and
    gradients match the eager layer within fp32 rounding (measured: loss equal, grads
    within 1e-7; dropout masks come from the keyed RNG streams, which run outside the
    compiled graphs). Measured speed-up on CPU (2 layers, hidden 256, fwd+bwd): 0.92x at
    sequence 256, 0.96x at 1024: none; see docs/attention_backends.md."""

    # -- activation recompute -----------------------------------------------------------
    recompute_granularity: Optional[str] = None
    """None, ``"full"`` (recompute whole layers in backward) or ``"selective"`` (only
    core attention, whose activations grow with s^2 but are cheap to recompute)."""

    recompute_method: Optional[str] = None
    """With full recompute: ``"uniform"`` checkpoints chunks of ``recompute_num_layers``
    layers; ``"block"`` checkpoints the first ``recompute_num_layers`` layers of each
    pipeline stage (chunk) individually and none of the rest."""

    recompute_num_layers: Optional[int] = None
    """Layers per chunk (uniform) or layers recomputed per stage (block)."""

    distribute_saved_activations: bool = False
    """Split each checkpointed layer's saved input over tp ranks (not with
    sequence_parallel, whose input is already split)."""

    # -- loss ---------------------------------------------------------------------------
    calculate_per_token_loss: bool = False
    """Schedules divide the summed loss by the number of tokens of the whole global batch
    instead of averaging per micro-batch."""

    # -- multi-token prediction (megacore.transformer.multi_token_prediction) -------------
    mtp_num_layers: Optional[int] = None
    """DeepSeek-V3's multi-token prediction: this many extra depths, depth k predicting the
    token k+1 positions ahead from the decoder's output (None: off)."""

    mtp_loss_scaling_factor: float = 0.1
    """Weight of the MTP loss (averaged over the depths) added to the language-model loss."""

    def __post_init__(self):
        super().__post_init__()
        if self.mtp_num_layers is not None and self.mtp_num_layers < 1:
            raise FieldError(f"mtp_num_layers must be None or >= 1, got {self.mtp_num_layers}",
                             "mtp_num_layers")
        self._fill_defaults()
        self._check_shape()
        self._check_numerics()
        self._check_recompute()

    # -- phases of __post_init__ ------------------------------------------------------
    def _fill_defaults(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FieldError(f"{name} must be a positive integer, got {value!r}", name)
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise FieldError(
                    f"hidden_size ({self.hidden_size}) is not divisible by "
                    f"num_attention_heads ({self.num_attention_heads}); set kv_channels",
                                 "hidden_size", "num_attention_heads", "kv_channels")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.init_method is None:
            self.init_method = init_method_normal(self.init_method_std)
        if self.output_layer_init_method is None:
            self.output_layer_init_method = scaled_init_method_normal(
                self.init_method_std, self.num_layers)

    def _check_shape(self) -> None:
        tp, heads, groups = (self.tensor_model_parallel_size, self.num_attention_heads,
                             self.num_query_groups)
        if heads % tp:
            raise FieldError(f"num_attention_heads ({heads}) must be divisible by "
                             f"tensor_model_parallel_size ({tp})",
                             "num_attention_heads", "tensor_model_parallel_size")
        if groups < 1 or heads % groups:
            raise FieldError(f"num_attention_heads ({heads}) must be divisible by "
                             f"num_query_groups ({groups})",
                             "num_attention_heads", "num_query_groups")
        if groups % tp and tp % groups:
            raise FieldError(
                f"num_query_groups ({groups}) and tensor_model_parallel_size ({tp}) must "
                "divide one another (each rank holds whole groups, or each group is "
                "replicated over whole ranks)", "num_query_groups", "tensor_model_parallel_size")
        if self.ffn_hidden_size % tp:
            raise FieldError(f"ffn_hidden_size ({self.ffn_hidden_size}) must be divisible "
                             f"by tensor_model_parallel_size ({tp})",
                             "ffn_hidden_size", "tensor_model_parallel_size")
        if self.normalization not in _NORMALIZATIONS:
            raise FieldError(f"normalization must be one of {_NORMALIZATIONS}, "
                             f"got {self.normalization!r}", "normalization")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FieldError(f"{name} must be in [0, 1), got {getattr(self, name)}", name)

    def _check_numerics(self) -> None:
        if self.apply_query_key_layer_scaling and not self.attention_softmax_in_fp32:
            raise FieldError("apply_query_key_layer_scaling needs "
                             "attention_softmax_in_fp32=True (Megatron turned it on "
                             "silently; set it explicitly)",
                             "apply_query_key_layer_scaling", "attention_softmax_in_fp32")
        self._check_window()
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise FieldError(f"transformer_impl must be 'local' or 'transformer_engine', "
                             f"got {self.transformer_impl!r}", "transformer_impl")
        if not isinstance(self.attention_backend, AttnBackend):
            raise FieldError(f"attention_backend must be an AttnBackend, "
                             f"got {self.attention_backend!r}", "attention_backend")
        if self.layout_independent_attention_dropout and self.attention_dropout > 0 and \
                self.attention_backend in (AttnBackend.flash, AttnBackend.fused):
            raise FieldError(
                f"layout_independent_attention_dropout runs attention dropout on the "
                f"explicit path, which attention_backend {self.attention_backend.name} "
                f"excludes; use attention_backend auto or unfused",
                             "layout_independent_attention_dropout", "attention_backend")

    def _check_window(self) -> None:
        if self.window_size is None:
            return
        window = tuple(self.window_size)
        if len(window) != 2 or not all(isinstance(w, int) and w >= -1 for w in window):
            raise FieldError(f"window_size must be a pair (left, right) of integers >= -1, "
                             f"got {self.window_size!r}", "window_size")
        self.window_size = window
        if self.context_parallel_size > 1:
            raise FieldError(f"window_size {window} (sliding-window attention) is not "
                             f"supported with context_parallel_size "
                             f"{self.context_parallel_size} > 1",
                             "window_size", "context_parallel_size")

    def _check_recompute(self) -> None:
        granularity, method, n = (self.recompute_granularity, self.recompute_method,
                                  self.recompute_num_layers)
        if granularity not in _RECOMPUTE_GRANULARITIES:
            raise FieldError(f"recompute_granularity must be one of "
                             f"{_RECOMPUTE_GRANULARITIES}, got {granularity!r}",
                             "recompute_granularity")
        if method not in _RECOMPUTE_METHODS:
            raise FieldError(f"recompute_method must be one of {_RECOMPUTE_METHODS}, "
                             f"got {method!r}", "recompute_method")
        if granularity == "full":
            if method is None:
                raise FieldError("recompute_granularity='full' needs recompute_method "
                                 "'uniform' or 'block'",
                                 "recompute_granularity", "recompute_method")
            if n is None or not 1 <= n <= self.num_layers:
                raise FieldError(f"recompute_granularity='full' needs recompute_num_layers "
                                 f"in [1, num_layers={self.num_layers}], got {n!r}",
                                 "recompute_granularity", "recompute_num_layers", "num_layers")
        elif method is not None or n is not None:
            raise FieldError(f"recompute_method ({method!r}) and recompute_num_layers "
                             f"({n!r}) apply only to recompute_granularity='full', "
                             f"got {granularity!r}",
                             "recompute_method", "recompute_num_layers", "recompute_granularity")
        if self.distribute_saved_activations:
            if self.sequence_parallel:
                raise FieldError("distribute_saved_activations and sequence_parallel "
                                 "cannot be used together",
                                 "distribute_saved_activations", "sequence_parallel")
            if granularity != "full":
                raise FieldError("distribute_saved_activations needs "
                                 "recompute_granularity='full'",
                                 "distribute_saved_activations", "recompute_granularity")
