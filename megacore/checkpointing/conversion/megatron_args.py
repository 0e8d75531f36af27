"""Megatron-LM's stored ``args`` (an ``argparse.Namespace``): safe loading, and the model
description it implies, both ways.

Megatron-LM writes ``args`` (its whole command line, parsed) into every checkpoint: the
legacy rank files and ``common.pt`` of a ``torch_dist`` directory. Unpickling it needs
``argparse.Namespace``; the RNG states next to it need numpy's array reconstruction; and
a few args are Megatron enums (``attention_backend``). :func:`load_megatron_file` loads
with ``torch.load(weights_only=True)`` and allow-lists exactly those classes by name,
nothing else: the enums are rebuilt as :class:`MegatronEnumValue` (their class name and
value), so megatron-core need not be installed. Any other class stops the load with a
message naming the file and the class.

:func:`description_from_args` reads the model shape (:class:`GPTDescription`) and the
layout (:class:`MegacoreLayout`) from ``args``; settings megacore's GPT cannot reproduce
(squared ReLU, ``apply_layernorm_1p``, multi-latent attention, ...) are refused with the
arg's name. :func:`args_from_description` writes the ``args`` a converted checkpoint
carries: the source's Megatron args when there are any, with the model and layout
fields set from the description.

Vocabulary: Megatron pads the tokenizer's vocabulary to a multiple of
``make_vocab_size_divisible_by * tp`` (``args.padded_vocab_size``) and its logits cover
every padded row, so the description keeps all ``padded_vocab_size`` rows unless
``--true-vocab-size`` says how many are real.
"""

from __future__ import annotations

import argparse
import pickle
from typing import Any, Dict, Optional

import torch

from megacore.checkpointing.conversion.model_description import GPTDescription
from megacore.checkpointing.conversion.tensor_rules import MegacoreLayout
from megacore.checkpointing.errors import CheckpointError

__all__ = ["load_megatron_file", "MegatronEnumValue", "description_from_args",
           "layout_from_args", "args_from_description", "MEGATRON_CHECKPOINT_VERSION"]

MEGATRON_CHECKPOINT_VERSION = 3.0
"""``checkpoint_version`` Megatron-LM writes (and this converter writes)."""

_MEGATRON_ENUMS = (
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.ModelType",
    "megatron.core.enums.ModelType",
)
"""Megatron enums that appear in stored ``args``, allow-listed by name."""


class MegatronEnumValue:
    """A Megatron enum member read from ``args`` without importing megatron-core.

    Attributes:
        enum: the enum's qualified class name.
        value: the member's value.
    """

    def __init__(self, enum: str, value: Any):
        self.enum, self.value = enum, value

    def __repr__(self) -> str:
        return f"{self.enum.rsplit('.', 1)[-1]}({self.value!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, MegatronEnumValue) and (self.enum, self.value) == (
            other.enum, other.value)

    def __hash__(self) -> int:
        return hash((self.enum, self.value))


def _enum_builder(name: str):
    def build(value):
        return MegatronEnumValue(name, value)
    build.__name__ = name.rsplit(".", 1)[-1]
    return build


def megatron_safe_globals() -> list:
    """The classes a Megatron checkpoint may hold (for ``torch.serialization.safe_globals``
    around a ``weights_only`` load)."""
    return _safe_globals()


def _safe_globals() -> list:
    import numpy as np

    allowed: list = [argparse.Namespace]
    # numpy arrays and dtypes inside Megatron's rng_state (np.random.get_state()).
    multiarray = getattr(np, "_core", None) or np.core
    allowed += [multiarray.multiarray._reconstruct, np.ndarray, np.dtype,
                type(np.dtype(np.uint32))]
    allowed += [(_enum_builder(n), n) for n in _MEGATRON_ENUMS]
    return allowed


def load_megatron_file(path: str, mmap: bool = False) -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` of a Megatron file with only the classes Megatron
    checkpoints contain allow-listed (``argparse.Namespace``, numpy RNG arrays, a few
    enums, by name).

    Raises:
        CheckpointError: the file is missing, corrupt, or holds another class (named).
    """
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        text = str(exc)
        hint = ""
        if "GLOBAL" in text or "global" in text:
            hint = (" (it holds a class outside the allow-list of argparse.Namespace, numpy "
                    "RNG arrays and Megatron's enums; nothing else is unpickled)")
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be loaded safely{hint}: {first}") from exc


# -- args -> description ------------------------------------------------------------------
_UNSUPPORTED = {  # arg: value megacore reproduces (anything else is refused)
    "squared_relu": False, "apply_layernorm_1p": False,
    "apply_residual_connection_post_layernorm": False, "multi_latent_attention": False,
    "mtp_num_layers": None, "moe_router_pre_softmax": False,
    "moe_router_topk_scaling_factor": None, "moe_expert_capacity_factor": None,
    "moe_grouped_gemm": False, "window_size": None,
    "account_for_embedding_in_pipeline_split": False,
    "account_for_loss_in_pipeline_split": False, "quick_geglu": False,
}


def _get(args, name: str, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def _check_supported(args, where: str) -> None:
    bad = []
    for name, ok in _UNSUPPORTED.items():
        value = getattr(args, name, None)
        if value is None or value == ok or (ok is None and value in (0, False)):
            continue
        bad.append(f"{name}={value!r}")
    score = getattr(args, "moe_router_score_function", "softmax") or "softmax"
    if score != "softmax":
        bad.append(f"moe_router_score_function={score!r}")
    if bad:
        raise CheckpointError(f"{where}: the Megatron model uses settings megacore's GPT "
                              f"does not reproduce: {', '.join(bad)}")


def _activation(args) -> str:
    if getattr(args, "swiglu", False):
        return "silu"
    if getattr(args, "openai_gelu", False):  # Megatron's tanh approximation of GeLU
        return "gelu_tanh"
    return "gelu"


def _position_type(args) -> str:
    kind = getattr(args, "position_embedding_type", None)
    if kind is None:
        kind = "rope" if getattr(args, "use_rotary_position_embeddings", False) \
            else "learned_absolute"
    if kind not in ("learned_absolute", "rope", "none"):
        raise CheckpointError(f"position_embedding_type={kind!r} is not supported (megacore "
                              "has learned_absolute, rope, none)")
    return kind


def _dtype_name(args) -> str:
    if getattr(args, "bf16", False):
        return "bfloat16"
    if getattr(args, "fp16", False):
        return "float16"
    dtype = getattr(args, "params_dtype", None)
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else "float32"


def _moe_fields(args) -> Dict[str, Any]:
    experts = getattr(args, "num_experts", None)
    if not experts:
        return {}
    freq = _get(args, "moe_layer_freq", 1)
    return dict(num_moe_experts=int(experts), moe_ffn_hidden_size=getattr(
        args, "moe_ffn_hidden_size", None), moe_router_topk=int(_get(args, "moe_router_topk", 2)),
        moe_layer_freq=list(freq) if isinstance(freq, (list, tuple)) else int(freq),
        moe_shared_expert_intermediate_size=getattr(
            args, "moe_shared_expert_intermediate_size", None),
        moe_shared_expert_gate=bool(getattr(args, "moe_shared_expert_gate", False)),
        moe_router_enable_expert_bias=bool(getattr(args, "moe_router_enable_expert_bias",
                                                   False)))


def layout_from_args(args, num_chunks: int = 1, where: str = "checkpoint") -> MegacoreLayout:
    """The saved parallel layout (``num_chunks``: ``model0..`` entries per rank file)."""
    tp = int(_get(args, "tensor_model_parallel_size", 1))
    pp = int(_get(args, "pipeline_model_parallel_size", 1))
    ep = int(_get(args, "expert_model_parallel_size", 1))
    etp = _get(args, "expert_tensor_parallel_size", tp)
    if getattr(args, "num_experts", None) and int(etp) != tp:
        raise CheckpointError(f"{where}: expert_tensor_parallel_size={etp} differs from "
                              f"tensor_model_parallel_size={tp}; not supported")
    return MegacoreLayout(
        tp=tp, pp=pp, ep=ep, vpp=num_chunks if num_chunks > 1 else None,
        first_stage_layers=getattr(args, "decoder_first_pipeline_num_layers", None),
        last_stage_layers=getattr(args, "decoder_last_pipeline_num_layers", None))


def description_from_args(args, *, embedding_rows: Optional[int],
                          true_vocab_size: Optional[int] = None,
                          where: str = "checkpoint") -> GPTDescription:
    """The model a Megatron checkpoint's ``args`` describe.

    Args:
        args: the stored ``argparse.Namespace``.
        embedding_rows: rows of the saved word embedding (all tp shards): the vocabulary
            when ``args.padded_vocab_size`` is absent.
        true_vocab_size: real vocabulary rows (``--true-vocab-size``); default: all rows.
        where: the file, for messages.
    """
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{where}: 'args' is not an argparse.Namespace "
                              f"({type(args).__name__}); not a Megatron-LM checkpoint")
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if getattr(args, name, None) is None:
            raise CheckpointError(f"{where}: args.{name} is missing")
    _check_supported(args, where)
    vocab = true_vocab_size or getattr(args, "padded_vocab_size", None) or embedding_rows
    if vocab is None:
        raise CheckpointError(f"{where}: no padded_vocab_size in args and no word embedding; "
                              "pass --true-vocab-size")
    gqa = getattr(args, "group_query_attention", False)
    seq = getattr(args, "max_position_embeddings", None) or getattr(args, "seq_length", 1024)
    desc = GPTDescription(
        num_layers=int(args.num_layers), hidden_size=int(args.hidden_size),
        num_attention_heads=int(args.num_attention_heads), vocab_size=int(vocab),
        ffn_hidden_size=getattr(args, "ffn_hidden_size", None),
        num_query_groups=getattr(args, "num_query_groups", None) if gqa else None,
        kv_channels=getattr(args, "kv_channels", None), max_position_embeddings=int(seq),
        position_embedding_type=_position_type(args),
        normalization=_get(args, "normalization", "LayerNorm"),
        layernorm_epsilon=float(_get(args, "norm_epsilon",
                                     _get(args, "layernorm_epsilon", 1e-5))),
        add_bias_linear=bool(_get(args, "add_bias_linear", True)),
        add_qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
        gated_linear_unit=bool(getattr(args, "swiglu", False)), activation=_activation(args),
        qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        share_embeddings_and_output_weights=not getattr(
            args, "untie_embeddings_and_output_weights", False),
        rotary_base=float(_get(args, "rotary_base", 10000)),
        rotary_percent=float(_get(args, "rotary_percent", 1.0)),
        rotary_interleaved=bool(getattr(args, "rotary_interleaved", False)),
        params_dtype=_dtype_name(args), **_moe_fields(args))
    desc.config_dict = _config_dict(args, desc)
    return desc


_TOKENIZER_ARGS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model",
                   "vocab_size")


def _config_dict(args, desc: GPTDescription) -> Dict[str, Any]:
    """megacore's run-configuration sections for this model (``model``, ``gpt``, and
    ``data`` for the tokenizer settings)."""
    tokenizer = {k: getattr(args, k) for k in _TOKENIZER_ARGS
                 if isinstance(getattr(args, k, None), (str, int))}
    gpt = {"make_vocab_size_divisible_by": int(_get(args, "make_vocab_size_divisible_by", 128)),
           "seq_length": int(_get(args, "seq_length", desc.max_position_embeddings))}
    model = {"fp16": bool(getattr(args, "fp16", False)),
             "bf16": bool(getattr(args, "bf16", False)),
             "activation_func": desc.activation}
    return {"model": model, "gpt": gpt, "data": tokenizer}


# -- description -> args ------------------------------------------------------------------
def args_from_description(desc: GPTDescription, layout: MegacoreLayout, *,
                          base: Optional[argparse.Namespace] = None,
                          padded_vocab_size: int,
                          make_vocab_size_divisible_by: int) -> argparse.Namespace:
    """The ``args`` a converted Megatron checkpoint stores: ``base`` (the source's Megatron
    args, if any) with the model, vocabulary and layout fields set; Megatron-LM's
    ``--use-checkpoint-args`` rebuilds the model from them."""
    args = argparse.Namespace(**vars(base)) if base is not None else argparse.Namespace()
    gqa = desc.num_query_groups != desc.num_attention_heads
    fields: Dict[str, Any] = dict(
        num_layers=desc.num_layers, hidden_size=desc.hidden_size,
        ffn_hidden_size=desc.ffn_hidden_size, num_attention_heads=desc.num_attention_heads,
        group_query_attention=gqa, num_query_groups=desc.num_query_groups,
        kv_channels=desc.kv_channels, max_position_embeddings=desc.max_position_embeddings,
        position_embedding_type=desc.position_embedding_type,
        rotary_base=int(desc.rotary_base), rotary_percent=desc.rotary_percent,
        rotary_interleaved=desc.rotary_interleaved, normalization=desc.normalization,
        norm_epsilon=desc.layernorm_epsilon, add_bias_linear=desc.add_bias_linear,
        add_qkv_bias=desc.add_qkv_bias, swiglu=desc.gated_linear_unit and
        desc.activation == "silu", openai_gelu=desc.activation == "gelu_tanh",
        squared_relu=False, qk_layernorm=desc.qk_layernorm,
        untie_embeddings_and_output_weights=not desc.share_embeddings_and_output_weights,
        padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        params_dtype=desc.torch_dtype, bf16=desc.params_dtype == "bfloat16",
        fp16=desc.params_dtype == "float16",
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.tp,
        decoder_first_pipeline_num_layers=layout.first_stage_layers,
        decoder_last_pipeline_num_layers=layout.last_stage_layers,
        num_experts=desc.num_moe_experts)
    if desc.activation not in ("silu", "gelu", "gelu_tanh") or (
            desc.gated_linear_unit and desc.activation != "silu"):
        gated = "gated " if desc.gated_linear_unit else ""
        raise CheckpointError(f"Megatron-LM has no flag for a {gated}{desc.activation} MLP; "
                              "cannot write its args")
    if desc.is_moe:
        fields.update(moe_ffn_hidden_size=desc.expert_ffn_hidden_size,
                      moe_router_topk=desc.moe_router_topk, moe_layer_freq=desc.moe_layer_freq,
                      moe_grouped_gemm=False,
                      moe_shared_expert_intermediate_size=desc.moe_shared_expert_intermediate_size,
                      moe_shared_expert_gate=desc.moe_shared_expert_gate,
                      moe_router_enable_expert_bias=desc.moe_router_enable_expert_bias)
    tokenizer = (desc.config_dict or {}).get("data") or {}
    for key in _TOKENIZER_ARGS:
        if getattr(args, key, None) is None and tokenizer.get(key) is not None:
            fields[key] = tokenizer[key]
    if getattr(args, "seq_length", None) is None:
        fields["seq_length"] = ((desc.config_dict or {}).get("gpt") or {}).get(
            "seq_length", desc.max_position_embeddings)
    # Megatron-LM's defaults (its load compares add_position_embedding with the run's).
    fields.setdefault("add_position_embedding", getattr(args, "add_position_embedding", True))
    fields.setdefault("use_rotary_position_embeddings",
                      getattr(args, "use_rotary_position_embeddings", False))
    for key, value in fields.items():
        setattr(args, key, value)
    return args
