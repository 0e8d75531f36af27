"""What a converter must know about a GPT model: its shape, not its weights.

:class:`GPTDescription` is read from a megacore checkpoint's saved run configuration
(``run_config_to_dict``: sections ``model`` = ``TransformerConfig`` fields and ``gpt`` =
``GPTModelArgs``) or from a Hugging Face ``config.json`` (``hf_mappings``), and written
back into the target's configuration. It decides the tensor names, their shapes and how
they are split over tp, read from the model built for it on the meta device
(:meth:`GPTDescription.model_tensors`, ``reference_model``).

Two facts are not in a run configuration: the true vocabulary size (pretrain passes the
tokenizer's size rounded up to ``make_vocab_size_divisible_by``; the checkpoint holds it
padded again to a multiple of tp) and the activation of non-gated MLPs (a callable, not
saved). Converters record both in a ``conversion`` section of the configuration they
write; otherwise the vocabulary is inferred from the saved rows (see
:func:`infer_vocab_size`) and the activation is megacore's default for the MLP kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megacore.checkpointing.conversion.reference_model import ModelTensors, build_model_tensors
from megacore.checkpointing.errors import CheckpointError
from megacore.transformer.activations import openai_gelu

__all__ = ["GPTDescription", "ACTIVATIONS", "infer_vocab_size", "CONVERSION_SECTION"]

CONVERSION_SECTION = "conversion"
"""Config-dict section with the facts a run configuration lacks (vocab size, activation)."""

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": openai_gelu,
    "silu": F.silu,
    "relu": F.relu,
}
"""Activation names a description may carry, and megacore's function for each."""


@dataclasses.dataclass
class GPTDescription:
    """The shape of a decoder-only GPT (megacore's ``GPTModel``) for conversion.

    Attributes:
        num_layers: transformer layers.
        hidden_size: model width ``h``.
        num_attention_heads: query heads ``np``.
        vocab_size: true vocabulary rows ``V`` (without tp padding).
        ffn_hidden_size: MLP inner width (default ``4h``).
        num_query_groups: key/value heads ``ng`` (default ``np``: multi-head).
        kv_channels: head dim ``hn`` (default ``h / np``).
        max_position_embeddings: rows of the learned position table / context length.
        position_embedding_type: ``learned_absolute``, ``rope`` or ``none``.
        normalization: ``LayerNorm`` or ``RMSNorm``.
        layernorm_epsilon: norm epsilon.
        add_bias_linear: biases in every linear layer.
        add_qkv_bias: bias in the fused QKV projection only.
        gated_linear_unit: gated MLP (fc1 holds ``[gate; up]``).
        activation: key of :data:`ACTIVATIONS`.
        qk_layernorm: per-head query/key norms.
        share_embeddings_and_output_weights: the output layer reuses the word embedding.
        rotary_base: RoPE base.
        rotary_percent: fraction of each head rotated.
        rotary_interleaved: RoPE pairs neighbouring channels (GPT-J) instead of halves.
        rope_scaling: Llama 3.1+ RoPE frequency scaling, with ``rope_scaling_factor``,
            ``rope_scaling_low_freq_factor``, ``rope_scaling_high_freq_factor`` and
            ``rope_scaling_original_max_position_embeddings``.
        window_size: sliding-window attention ``(left, right)`` (None: full attention).
        num_moe_experts: routed experts (None: dense MLPs).
        moe_ffn_hidden_size: expert inner width (default ``ffn_hidden_size``).
        moe_router_topk: experts per token.
        moe_layer_freq: which layers are MoE (int period or 0/1 list).
        moe_grouped_gemm: experts stored stacked (``GroupedMLP``) instead of one MLP each.
        moe_shared_expert_intermediate_size: shared expert width (None: none).
        moe_shared_expert_gate: the shared expert has a sigmoid gate.
        moe_router_enable_expert_bias: the router keeps a learned ``expert_bias`` buffer.
        moe_router_score_function: ``softmax`` or ``sigmoid`` (DeepSeek-V3).
        moe_router_pre_softmax: softmax over all experts before the top-k (no
            renormalization; Qwen3-MoE's ``norm_topk_prob=False``).
        moe_router_num_groups, moe_router_group_topk: group-limited routing (None: off).
        moe_router_topk_scaling_factor: routed weights times this (None: 1).
        multi_latent_attention: DeepSeek's multi-latent attention instead of (G)QA, with
            ``q_lora_rank`` (None: queries projected directly), ``kv_lora_rank``,
            ``qk_head_dim`` (per-head part without position), ``qk_pos_emb_head_dim``
            (rotary part) and ``v_head_dim``; ``rope_type`` ``yarn`` adds YaRN with
            ``rotary_scaling_factor``, ``original_max_position_embeddings``,
            ``beta_fast``, ``beta_slow``, ``mscale`` and ``mscale_all_dim``
            (:class:`~megacore.transformer.mla_config.MLAConfig`).
        mtp_num_layers: multi-token prediction depths (None: none), on the last stage.
        params_dtype: dtype name of the weights (``float32``, ``bfloat16``, ``float16``).
        config_dict: the full saved configuration this came from (carried to the target).
        block_spec: the decoder block spec the model was built with (None: megacore's
            GPT spec for the config); a program with custom layers passes its own so its
            extra parameters convert. Not saved.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    max_position_embeddings: int = 1024
    position_embedding_type: str = "learned_absolute"
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    gated_linear_unit: bool = False
    activation: str = "gelu"
    qk_layernorm: bool = False
    share_embeddings_and_output_weights: bool = True
    rotary_base: float = 10000
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    window_size: Optional[Tuple[int, int]] = None
    num_moe_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: int = 2
    moe_layer_freq: Any = 1
    moe_grouped_gemm: bool = False
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    moe_router_enable_expert_bias: bool = False
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_topk_scaling_factor: Optional[float] = None
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    rope_type: str = "rope"
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    mtp_num_layers: Optional[int] = None
    params_dtype: str = "float32"
    config_dict: Optional[Dict[str, Any]] = dataclasses.field(default=None, repr=False)
    block_spec: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self._tensors: Optional[Tuple[str, ModelTensors]] = None  # not a field: a cache
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_query_groups ({self.num_query_groups})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got "
                             f"{self.activation!r}")
        if isinstance(self.moe_layer_freq, (list, tuple)):
            self.moe_layer_freq = [int(x) for x in self.moe_layer_freq]
        if self.window_size is not None:
            self.window_size = tuple(int(w) for w in self.window_size)
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")

    # -- derived ---------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return bool(self.num_moe_experts)

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def is_moe_layer(self, layer: int) -> bool:
        """Whether 0-based ``layer`` has an MoE MLP (``moe_layer_freq`` semantics)."""
        if not self.is_moe:
            return False
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return layer % freq == 0
        return bool(list(freq)[layer])

    def model_tensors(self) -> ModelTensors:
        """Canonical tensor names (module order) and tp splits of this model, read from
        the model itself built on the meta device (``reference_model``). Built once, and
        again only when a field changed since."""
        key = repr([(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                    if f.name not in ("config_dict", "block_spec")])
        key += f"/{id(self.block_spec)}"
        if self._tensors is None or self._tensors[0] != key:
            self._tensors = (key, build_model_tensors(self, self.block_spec))
        return self._tensors[1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.params_dtype.replace("torch.", ""))

    # -- to megacore -----------------------------------------------------------------
    def transformer_config_kwargs(self) -> Dict[str, Any]:
        """``TransformerConfig`` fields that build this model (layout fields excluded)."""
        kw = dict(num_layers=self.num_layers, hidden_size=self.hidden_size,
                  num_attention_heads=self.num_attention_heads,
                  ffn_hidden_size=self.ffn_hidden_size, num_query_groups=self.num_query_groups,
                  kv_channels=self.kv_channels, normalization=self.normalization,
                  layernorm_epsilon=self.layernorm_epsilon, add_bias_linear=self.add_bias_linear,
                  add_qkv_bias=self.add_qkv_bias, gated_linear_unit=self.gated_linear_unit,
                  activation_func=ACTIVATIONS[self.activation], qk_layernorm=self.qk_layernorm,
                  rotary_interleaved=self.rotary_interleaved, params_dtype=self.torch_dtype,
                  window_size=self.window_size, mtp_num_layers=self.mtp_num_layers)
        if self.multi_latent_attention:
            kw.update(multi_latent_attention=True, q_lora_rank=self.q_lora_rank,
                      kv_lora_rank=self.kv_lora_rank, qk_head_dim=self.qk_head_dim,
                      qk_pos_emb_head_dim=self.qk_pos_emb_head_dim, v_head_dim=self.v_head_dim,
                      rope_type=self.rope_type, rotary_scaling_factor=self.rotary_scaling_factor,
                      original_max_position_embeddings=self.original_max_position_embeddings,
                      beta_fast=self.beta_fast, beta_slow=self.beta_slow, mscale=self.mscale,
                      mscale_all_dim=self.mscale_all_dim)
        if self.is_moe:
            kw.update(num_moe_experts=self.num_moe_experts,
                      moe_ffn_hidden_size=self.moe_ffn_hidden_size,
                      moe_router_topk=self.moe_router_topk, moe_layer_freq=self.moe_layer_freq,
                      moe_grouped_gemm=self.moe_grouped_gemm,
                      moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
                      moe_shared_expert_gate=self.moe_shared_expert_gate,
                      moe_router_enable_expert_bias=self.moe_router_enable_expert_bias,
                      moe_router_score_function=self.moe_router_score_function,
                      moe_router_pre_softmax=self.moe_router_pre_softmax,
                      moe_router_num_groups=self.moe_router_num_groups,
                      moe_router_group_topk=self.moe_router_group_topk,
                      moe_router_topk_scaling_factor=self.moe_router_topk_scaling_factor)
        return kw

    def gpt_model_kwargs(self) -> Dict[str, Any]:
        """``GPTModel`` keyword arguments (besides config, spec and stage flags)."""
        return dict(vocab_size=self.vocab_size,
                    max_sequence_length=self.max_position_embeddings,
                    share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
                    position_embedding_type=self.position_embedding_type,
                    rotary_percent=self.rotary_percent, rotary_base=int(self.rotary_base),
                    **self._rope_scaling_kwargs())

    def _rope_scaling_kwargs(self) -> Dict[str, Any]:
        return dict(rope_scaling=self.rope_scaling, rope_scaling_factor=self.rope_scaling_factor,
                    rope_scaling_low_freq_factor=self.rope_scaling_low_freq_factor,
                    rope_scaling_high_freq_factor=self.rope_scaling_high_freq_factor,
                    rope_scaling_original_max_position_embeddings=
                    self.rope_scaling_original_max_position_embeddings)

    def to_config_dict(self, layout_fields: Dict[str, Any]) -> Dict[str, Any]:
        """A run-configuration dict for the target: the source's, with this description's
        model fields, the target layout (``layout_fields``: TransformerConfig layout
        fields) and the ``conversion`` section."""
        out = {k: dict(v) if isinstance(v, dict) else v
               for k, v in (self.config_dict or {}).items()}
        model = out.setdefault("model", {})
        kw = self.transformer_config_kwargs()
        kw["activation_func"] = kw["activation_func"].__name__  # as a run config saves it
        kw["params_dtype"] = str(self.torch_dtype)
        model.update(kw)
        model.update(layout_fields)
        gpt = out.setdefault("gpt", {})
        gpt.update(max_position_embeddings=self.max_position_embeddings,
                   position_embedding_type=self.position_embedding_type,
                   rotary_percent=self.rotary_percent, rotary_base=int(self.rotary_base),
                   untie_embeddings_and_output_weights=
                   not self.share_embeddings_and_output_weights)
        scaling = self._rope_scaling_kwargs()
        gpt["use_rope_scaling"] = scaling.pop("rope_scaling")
        gpt.update(scaling)
        gpt.setdefault("seq_length", self.max_position_embeddings)
        out[CONVERSION_SECTION] = {"vocab_size": self.vocab_size, "activation": self.activation}
        return out

    # -- from megacore ---------------------------------------------------------------
    @classmethod
    def from_config_dict(cls, config_dict: Dict[str, Any], *, embedding_rows: Optional[int],
                         tp_size: int, true_vocab_size: Optional[int] = None,
                         block_spec: Any = None) -> "GPTDescription":
        """From a saved run configuration (``model``/``gpt`` sections).

        Args:
            config_dict: the checkpoint's ``config``.
            embedding_rows: rows of the saved (tp-padded) word embedding, for
                :func:`infer_vocab_size` when the vocabulary is not recorded.
            tp_size: the tp size those rows were padded for.
            true_vocab_size: overrides everything (``--true-vocab-size``).
            block_spec: the model's decoder block spec (None: megacore's GPT spec).
        """
        if not config_dict or "model" not in config_dict:
            raise CheckpointError("the checkpoint carries no model configuration ('config' "
                                  "with a 'model' section): it was not saved by pretrain or "
                                  "by this converter, so its shapes cannot be known")
        model, gpt = config_dict["model"], config_dict.get("gpt") or {}
        extra = config_dict.get(CONVERSION_SECTION) or {}
        vocab = true_vocab_size or extra.get("vocab_size")
        if vocab is None:
            vocab = infer_vocab_size(embedding_rows, tp_size,
                                     int(gpt.get("make_vocab_size_divisible_by") or 1))
        gated = bool(model.get("gated_linear_unit", False))
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in model.items() if k in fields and v is not None}
        kw.update(vocab_size=int(vocab), config_dict=config_dict, block_spec=block_spec,
                  activation=extra.get("activation", _activation_name(model, gated)),
                  params_dtype=str(model.get("params_dtype", "float32")).replace("torch.", ""),
                  max_position_embeddings=int(gpt.get("max_position_embeddings")
                                              or gpt.get("seq_length") or 1024),
                  position_embedding_type=gpt.get("position_embedding_type",
                                                  "learned_absolute"),
                  share_embeddings_and_output_weights=
                  not gpt.get("untie_embeddings_and_output_weights", False),
                  rotary_base=gpt.get("rotary_base", 10000),
                  rotary_percent=gpt.get("rotary_percent", 1.0),
                  rope_scaling=bool(gpt.get("use_rope_scaling", False)))
        for name in ("rope_scaling_factor", "rope_scaling_low_freq_factor",
                     "rope_scaling_high_freq_factor",
                     "rope_scaling_original_max_position_embeddings"):
            if gpt.get(name) is not None:
                kw[name] = gpt[name]
        kw.setdefault("moe_layer_freq", 1)
        return cls(**kw)


def _activation_name(model: Dict[str, Any], gated: bool) -> str:
    """The :data:`ACTIVATIONS` key of a saved ``activation_func`` name (pretrain saves
    ``openai_gelu`` for ``--openai-gelu``); megacore's default for the MLP kind otherwise."""
    by_name = {fn.__name__: key for key, fn in ACTIVATIONS.items()}
    return by_name.get(model.get("activation_func"), "silu" if gated else "gelu")


def infer_vocab_size(rows: Optional[int], tp_size: int, multiple: int) -> int:
    """The true vocabulary from tp-padded embedding rows.

    Pretrain's vocabulary is a multiple of ``make_vocab_size_divisible_by`` (``multiple``)
    and GPTModel pads it to a multiple of tp, adding fewer than tp rows; the largest
    multiple of ``multiple`` that is ``> rows - tp`` is the one. With ``multiple`` 1 the
    padding cannot be told from real rows: all rows are kept (extra rows are zeros), pass
    ``--true-vocab-size`` to drop them.
    """
    if rows is None:
        raise CheckpointError("cannot infer the vocabulary size: no word embedding found; "
                              "pass --true-vocab-size")
    candidate = rows // multiple * multiple
    return candidate if candidate > rows - tp_size and candidate > 0 else rows
