"""Hugging Face GPT-2 / Llama / Mistral / Mixtral / Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3
names and layouts <-> canonical tensors.

Each :class:`MappingGroup` converts a few canonical tensors to the HF tensors they make up
and back (exact inverses, so HF -> megacore -> HF is bitwise). Layout facts:

* GPT-2 ``Conv1D`` weights are ``[in, out]``: transposed against megacore's ``[out, in]``.
* GPT-2's fused ``c_attn`` columns are ``[q | k | v]`` (each head-major); Llama has
  separate ``q_proj [np*hn, h]``, ``k_proj``/``v_proj [ng*hn, h]``. megacore's fused QKV
  rows are per key/value group: ``[ng, np/ng + 2, hn]`` = ``[q heads of g, k_g, v_g]``.
* RoPE: HF rotates halves (``rotate_half``), like megacore's default; with
  ``rotary_interleaved`` the q/k rows of each head are permuted (pairs ``(2i, 2i+1)`` <->
  ``(i, i + hn/2)``).
* SwiGLU: megacore's fc1 is ``[gate; up]`` (its stride 2, read from the layer by
  ``tensor_split``, splits it for tp); HF has ``gate_proj``/``up_proj`` (Mixtral
  experts: ``w1`` gate, ``w3`` up, ``w2`` down; the router is ``block_sparse_moe.gate``).
* Qwen2: ``q/k/v_proj`` have biases (megacore's ``add_qkv_bias``: the fused QKV bias,
  laid out like the weight rows). Qwen3: per-head RMSNorms ``q_norm``/``k_norm`` over
  ``hn`` channels, before RoPE (megacore's ``qk_layernorm``).
* Config facts: ``rope_parameters`` / ``rope_scaling`` of type ``llama3`` are megacore's
  Llama 3.1+ RoPE scaling (factor, low/high frequency factors, original context); type
  ``yarn`` (DeepSeek-V3 only) is ``rope_type="yarn"`` with ``factor`` ->
  ``rotary_scaling_factor`` and ``original_max_position_embeddings``, ``beta_fast``,
  ``beta_slow``, ``mscale``, ``mscale_all_dim`` under their own names (a missing
  ``mscale`` is 0, which like transformers' None selects the plain ``m(factor)`` cos/sin
  factor; ``attention_factor`` and ``truncate: false`` are refused);
  Mistral's ``sliding_window = w`` lets a query see ``w`` keys including its own, i.e.
  ``window_size = (w - 1, 0)``.
* Qwen3-MoE: Qwen3's attention; MoE layers ``mlp.gate`` (router) and
  ``mlp.experts.<e>.{gate,up,down}_proj`` (``save_pretrained`` writes one tensor per
  expert; transformers 5 stacks them in memory only), dense layers where
  ``mlp_only_layers`` / ``decoder_sparse_step`` say. Its router is a softmax over all
  experts, top-k, renormalized when ``norm_topk_prob`` (= megacore's default top-k
  softmax; ``norm_topk_prob=False`` = ``moe_router_pre_softmax``).
* DeepSeek-V3: multi-latent attention (``q_a_proj``/``q_a_layernorm``/``q_b_proj`` or
  ``q_proj``; ``kv_a_proj_with_mqa``/``kv_a_layernorm``/``kv_b_proj``; the same row
  layouts as megacore's ``linear_q_down_proj`` ...; ``rope_interleave`` =
  ``rotary_interleaved``), the first ``first_k_dense_replace`` layers dense, then
  sigmoid routing with ``mlp.gate.e_score_correction_bias`` (= the router's
  ``expert_bias``), ``n_group``/``topk_group`` group-limited choice,
  ``routed_scaling_factor`` and ``n_shared_experts`` shared experts
  (``mlp.shared_experts``, width ``n_shared_experts * moe_intermediate_size``).
  transformers scores a group by its best 2 experts, megacore by its best
  ``topk // group_topk``: only configs where those agree convert.
* DeepSeek-V3 multi-token prediction (``num_nextn_predict_layers`` = megacore's
  ``mtp_num_layers``): depth ``i`` is stored as the extra layer ``model.layers.<N>``,
  ``N = num_hidden_layers + i``: ``enorm``, ``hnorm``, ``eh_proj`` (``[h, 2h]``, input
  ``[enorm(embedding); hnorm(hidden)]``, megacore's order), ``shared_head.norm`` (the
  depth's ``final_layernorm``) and a decoder layer under the same prefix
  (``mtp.layers.<i>.transformer_layer``, built like the last decoder layer), plus
  ``embed_tokens`` and ``shared_head.head``: copies of the model's embedding and output
  head, which megacore shares, so they must equal them on import and are written as
  copies on export. transformers does not run these layers (it ignores their weights).
* Tied embeddings: GPT-2 saves no ``lm_head.weight``; if a checkpoint has one it must
  equal the word embedding (checked, then consumed).

Shapes: ``h`` hidden, ``np`` heads, ``ng`` key/value groups, ``hn`` head dim, ``f`` MLP
width, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List

import torch

from megacore.checkpointing.conversion.manifest import ConversionError
from megacore.checkpointing.conversion.model_description import GPTDescription
from megacore.checkpointing.conversion.tensor_rules import OUTPUT_LAYER, WORD_EMBEDDING

__all__ = ["MappingGroup", "HF_ARCHITECTURES", "refuse_extra_layers", "mapping_groups",
           "choose_architecture", "description_from_hf_config", "hf_config_from_description",
           "qkv_to_megacore", "qkv_from_megacore"]

DEEPSEEK, QWEN3_MOE = "DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM"
HF_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM",
                    "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", QWEN3_MOE,
                    DEEPSEEK)
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "MixtralForCausalLM": "mixtral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3", QWEN3_MOE: "qwen3_moe", DEEPSEEK: "deepseek_v3"}
_MOE_ARCHS = ("MixtralForCausalLM", QWEN3_MOE, DEEPSEEK)
_WINDOWED = ("MistralForCausalLM", "MixtralForCausalLM")
_HF_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
           "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
_TO_HF_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
Tensors = Dict[str, torch.Tensor]


@dataclasses.dataclass
class MappingGroup:
    """Canonical tensors <-> HF tensors that are converted together.

    Attributes:
        canonical: canonical model names.
        hf: HF names written and required on load.
        to_hf: canonical tensors (by name) -> HF tensors (by name).
        from_hf: the inverse.
        duplicates: optional HF names that, when present, must equal ``hf[0]`` (a tied
            ``lm_head.weight``).
        copies: HF names that hold copies of ``hf[0]`` (DeepSeek's multi-token-prediction
            ``embed_tokens`` and ``shared_head.head``): required and equal on import,
            written on export.
    """

    canonical: List[str]
    hf: List[str]
    to_hf: Callable[[Tensors], Tensors]
    from_hf: Callable[[Tensors], Tensors]
    duplicates: List[str] = dataclasses.field(default_factory=list)
    copies: List[str] = dataclasses.field(default_factory=list)


def _same(c: str, h: str) -> MappingGroup:
    return MappingGroup([c], [h], lambda t: {h: t[c]}, lambda t: {c: t[h]})


def _transposed(c: str, h: str) -> MappingGroup:
    return MappingGroup([c], [h], lambda t: {h: t[c].t().contiguous()},
                        lambda t: {c: t[h].t().contiguous()})


# -- fused QKV -----------------------------------------------------------------------------
def qkv_to_megacore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, np_: int, ng: int,
                    hn: int) -> torch.Tensor:
    """``q [np*hn, ...]``, ``k, v [ng*hn, ...]`` -> megacore rows ``[ng*(np/ng+2)*hn, ...]``."""
    rest = tuple(q.shape[1:])
    parts = (q.reshape(ng, np_ // ng, hn, *rest), k.reshape(ng, 1, hn, *rest),
             v.reshape(ng, 1, hn, *rest))
    return torch.cat(parts, dim=1).reshape(ng * (np_ // ng + 2) * hn, *rest).contiguous()


def qkv_from_megacore(qkv: torch.Tensor, *, np_: int, ng: int, hn: int):
    """Inverse of :func:`qkv_to_megacore`: ``(q, k, v)``."""
    rest, qpg = tuple(qkv.shape[1:]), np_ // ng
    x = qkv.reshape(ng, qpg + 2, hn, *rest)
    return (x[:, :qpg].reshape(np_ * hn, *rest).contiguous(),
            x[:, qpg].reshape(ng * hn, *rest).contiguous(),
            x[:, qpg + 1].reshape(ng * hn, *rest).contiguous())


def _interleaved_to_half(w: torch.Tensor, heads: int, hn: int) -> torch.Tensor:
    rest = tuple(w.shape[1:])  # per head: rows (2i, 2i+1) -> (i, i + hn/2)
    return w.reshape(heads, hn // 2, 2, *rest).transpose(1, 2).reshape(heads * hn, *rest)


def _half_to_interleaved(w: torch.Tensor, heads: int, hn: int) -> torch.Tensor:
    rest = tuple(w.shape[1:])
    return w.reshape(heads, 2, hn // 2, *rest).transpose(1, 2).reshape(heads * hn, *rest)


def _gpt2_qkv(prefix: str, c: str, d: GPTDescription, suffix: str) -> MappingGroup:
    kw = dict(np_=d.num_attention_heads, ng=d.num_query_groups, hn=d.kv_channels)
    h = f"{prefix}.attn.c_attn.{suffix}"

    def to_hf(t):
        q, k, v = qkv_from_megacore(t[c], **kw)  # [np*hn, (h)] each
        fused = torch.cat([q, k, v])  # [3h, (h)]
        return {h: fused.t().contiguous() if fused.dim() == 2 else fused}

    def from_hf(t):
        fused = t[h].t() if t[h].dim() == 2 else t[h]  # [h, 3h] -> [3h, h]
        q, k, v = fused.chunk(3)
        return {c: qkv_to_megacore(q, k, v, **kw)}

    return MappingGroup([c], [h], to_hf, from_hf)


def _llama_qkv(prefix: str, c: str, d: GPTDescription, suffix: str = "weight") -> MappingGroup:
    np_, ng, hn = d.num_attention_heads, d.num_query_groups, d.kv_channels
    names = [f"{prefix}.self_attn.{p}_proj.{suffix}" for p in "qkv"]
    inter = d.rotary_interleaved

    def to_hf(t):
        q, k, v = qkv_from_megacore(t[c], np_=np_, ng=ng, hn=hn)
        if inter:
            q, k = _interleaved_to_half(q, np_, hn), _interleaved_to_half(k, ng, hn)
        return dict(zip(names, (q.contiguous(), k.contiguous(), v)))

    def from_hf(t):
        q, k, v = (t[n] for n in names)
        if inter:
            q, k = _half_to_interleaved(q, np_, hn), _half_to_interleaved(k, ng, hn)
        return {c: qkv_to_megacore(q, k, v, np_=np_, ng=ng, hn=hn)}

    return MappingGroup([c], names, to_hf, from_hf)


def _gated(c: str, gate: str, up: str) -> MappingGroup:
    def to_hf(t):
        g, u = t[c].chunk(2)  # [2f, h] -> [f, h] x 2
        return {gate: g.contiguous(), up: u.contiguous()}

    return MappingGroup([c], [gate, up], to_hf, lambda t: {c: torch.cat([t[gate], t[up]])})


def _expert_names(hp: str, e: int, mixtral: bool):
    """HF ``(gate, up, down)`` weight names of routed expert ``e`` under ``hp``."""
    if mixtral:
        return tuple(f"{hp}.experts.{e}.w{i}.weight" for i in (1, 3, 2))
    return tuple(f"{hp}.experts.{e}.{x}_proj.weight" for x in ("gate", "up", "down"))


def _grouped_expert(p: str, e: int, hp: str, mixtral: bool = True) -> List[MappingGroup]:
    w1, w3, w2 = _expert_names(hp, e, mixtral)
    c1, c2 = f"{p}.mlp.experts.weight1/expert{e}", f"{p}.mlp.experts.weight2/expert{e}"

    def to_hf(t):
        g, u = t[c1].t().chunk(2)  # [h, 2f] -> [2f, h] -> [f, h] x 2
        return {w1: g.contiguous(), w3: u.contiguous()}

    return [MappingGroup([c1], [w1, w3], to_hf,
                         lambda t: {c1: torch.cat([t[w1], t[w3]]).t().contiguous()}),
            _transposed(c2, w2)]


# -- per architecture ----------------------------------------------------------------------
def _gpt2_groups(d: GPTDescription) -> List[MappingGroup]:
    tied = d.share_embeddings_and_output_weights
    groups = [MappingGroup([WORD_EMBEDDING], ["transformer.wte.weight"],
                           lambda t: {"transformer.wte.weight": t[WORD_EMBEDDING]},
                           lambda t: {WORD_EMBEDDING: t["transformer.wte.weight"]},
                           duplicates=["lm_head.weight"] if tied else []),
              _same("embedding.position_embeddings.weight", "transformer.wpe.weight")]
    for layer in range(d.num_layers):
        p, h = f"decoder.layers.{layer}", f"transformer.h.{layer}"
        groups += [_same(f"{p}.input_layernorm.{s}", f"{h}.ln_1.{s}") for s in ("weight", "bias")]
        groups += [_gpt2_qkv(h, f"{p}.self_attention.linear_qkv.{s}", d, s)
                   for s in ("weight", "bias")]
        groups += [_transposed(f"{p}.self_attention.linear_proj.weight", f"{h}.attn.c_proj.weight"),
                   _same(f"{p}.self_attention.linear_proj.bias", f"{h}.attn.c_proj.bias")]
        groups += [_same(f"{p}.pre_mlp_layernorm.{s}", f"{h}.ln_2.{s}") for s in ("weight", "bias")]
        groups += [_transposed(f"{p}.mlp.linear_fc1.weight", f"{h}.mlp.c_fc.weight"),
                   _same(f"{p}.mlp.linear_fc1.bias", f"{h}.mlp.c_fc.bias"),
                   _transposed(f"{p}.mlp.linear_fc2.weight", f"{h}.mlp.c_proj.weight"),
                   _same(f"{p}.mlp.linear_fc2.bias", f"{h}.mlp.c_proj.bias")]
    groups += [_same(f"decoder.final_layernorm.{s}", f"transformer.ln_f.{s}")
               for s in ("weight", "bias")]
    if not tied:
        groups.append(_same(OUTPUT_LAYER, "lm_head.weight"))
    return groups


def _mla_groups(p: str, h: str, d: GPTDescription) -> List[MappingGroup]:
    """DeepSeek's attention: each HF projection is one megacore tensor, same layout."""
    a, ha = f"{p}.self_attention", f"{h}.self_attn"
    pairs = [("linear_q_proj", "q_proj")] if d.q_lora_rank is None else [
        ("linear_q_down_proj", "q_a_proj"), ("q_layernorm", "q_a_layernorm"),
        ("linear_q_up_proj", "q_b_proj")]
    pairs += [("linear_kv_down_proj", "kv_a_proj_with_mqa"), ("kv_layernorm", "kv_a_layernorm"),
              ("linear_kv_up_proj", "kv_b_proj")]
    return [_same(f"{a}.{c}.weight", f"{ha}.{x}.weight") for c, x in pairs]


def _attention_groups(p: str, h: str, d: GPTDescription) -> List[MappingGroup]:
    if d.multi_latent_attention:
        return _mla_groups(p, h, d)
    groups = [_llama_qkv(h, f"{p}.self_attention.linear_qkv.weight", d)]
    if d.add_qkv_bias:  # Qwen2
        groups.append(_llama_qkv(h, f"{p}.self_attention.linear_qkv.bias", d, "bias"))
    if d.qk_layernorm:  # Qwen3
        groups += [_same(f"{p}.self_attention.{x}_layernorm.weight",
                         f"{h}.self_attn.{x}_norm.weight") for x in "qk"]
    return groups


def _moe_groups(p: str, h: str, d: GPTDescription, mixtral: bool) -> List[MappingGroup]:
    """Router, expert bias, routed experts and shared experts of one MoE layer."""
    hp = f"{h}.block_sparse_moe" if mixtral else f"{h}.mlp"
    groups = [_same(f"{p}.mlp.router.weight", f"{hp}.gate.weight")]
    if d.moe_router_enable_expert_bias:  # DeepSeek-V3
        groups.append(_same(f"{p}.mlp.router.expert_bias", f"{hp}.gate.e_score_correction_bias"))
    for e in range(d.num_moe_experts):
        if d.moe_grouped_gemm:
            groups += _grouped_expert(p, e, hp, mixtral)
            continue
        c = f"{p}.mlp.experts.local_experts.{e}"
        gate, up, down = _expert_names(hp, e, mixtral)
        groups += [_gated(f"{c}.linear_fc1.weight", gate, up),
                   _same(f"{c}.linear_fc2.weight", down)]
    if d.moe_shared_expert_intermediate_size:  # DeepSeek-V3
        c, s = f"{p}.mlp.shared_experts.mlp", f"{hp}.shared_experts"
        groups += [_gated(f"{c}.linear_fc1.weight", f"{s}.gate_proj.weight",
                          f"{s}.up_proj.weight"),
                   _same(f"{c}.linear_fc2.weight", f"{s}.down_proj.weight")]
    return groups


def _llama_groups(d: GPTDescription, architecture: str) -> List[MappingGroup]:
    tied = d.share_embeddings_and_output_weights
    mtp = [f"model.layers.{d.num_layers + i}" for i in range(d.mtp_num_layers or 0)]
    embedding = MappingGroup([WORD_EMBEDDING], ["model.embed_tokens.weight"],
                             lambda t: {"model.embed_tokens.weight": t[WORD_EMBEDDING]},
                             lambda t: {WORD_EMBEDDING: t["model.embed_tokens.weight"]},
                             duplicates=["lm_head.weight"] if tied else [],
                             copies=[f"{h}.embed_tokens.weight" for h in mtp])
    groups = [embedding]
    for layer in range(d.num_layers):
        groups += _layer_groups(f"decoder.layers.{layer}", f"model.layers.{layer}", d,
                                d.is_moe_layer(layer), architecture)
    groups.append(_same("decoder.final_layernorm.weight", "model.norm.weight"))
    heads = [f"{h}.shared_head.head.weight" for h in mtp]
    if tied:
        embedding.copies += heads
    else:
        groups.append(_same(OUTPUT_LAYER, "lm_head.weight"))
        groups[-1].copies = heads
    for i, h in enumerate(mtp):
        groups += _mtp_groups(f"mtp.layers.{i}", h, d, architecture)
    return groups


def _layer_groups(p: str, h: str, d: GPTDescription, moe: bool,
                  architecture: str) -> List[MappingGroup]:
    """One transformer layer: megacore prefix ``p``, HF prefix ``h``."""
    groups = [_same(f"{p}.input_layernorm.weight", f"{h}.input_layernorm.weight")]
    groups += _attention_groups(p, h, d)
    groups += [_same(f"{p}.self_attention.linear_proj.weight", f"{h}.self_attn.o_proj.weight"),
               _same(f"{p}.pre_mlp_layernorm.weight", f"{h}.post_attention_layernorm.weight")]
    if moe:
        return groups + _moe_groups(p, h, d, mixtral=architecture == "MixtralForCausalLM")
    return groups + [_gated(f"{p}.mlp.linear_fc1.weight", f"{h}.mlp.gate_proj.weight",
                            f"{h}.mlp.up_proj.weight"),
                     _same(f"{p}.mlp.linear_fc2.weight", f"{h}.mlp.down_proj.weight")]


def _mtp_groups(p: str, h: str, d: GPTDescription, architecture: str) -> List[MappingGroup]:
    """One DeepSeek multi-token-prediction depth (its embedding and head are copies)."""
    groups = [_same(f"{p}.{x}.weight", f"{h}.{x}.weight") for x in ("enorm", "hnorm", "eh_proj")]
    groups += _layer_groups(f"{p}.transformer_layer", h, d,
                            d.is_moe_layer(d.num_layers - 1), architecture)
    return groups + [_same(f"{p}.final_layernorm.weight", f"{h}.shared_head.norm.weight")]


def refuse_extra_layers(names, d: GPTDescription, architecture: str, where: str) -> None:
    """Refuse weights of layers past ``num_hidden_layers`` (+ DeepSeek's
    ``num_nextn_predict_layers`` multi-token-prediction layers, which are converted): the
    config does not say what they are."""
    known = d.num_layers + (d.mtp_num_layers or 0)
    extra = sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")
                    and int(n.split(".")[2]) >= known})
    if not extra:
        return
    if architecture == DEEPSEEK:
        raise ConversionError(f"{where}: weights of layers {extra} beyond num_hidden_layers "
                              f"{d.num_layers} + num_nextn_predict_layers "
                              f"{d.mtp_num_layers or 0}: set num_nextn_predict_layers in "
                              "config.json to convert multi-token-prediction layers, or "
                              "remove them from the checkpoint")
    raise ConversionError(f"{where}: weights of layers {extra} beyond num_hidden_layers "
                          f"{d.num_layers}, which {architecture} does not have")


def _require(ok: bool, arch: str, what: str) -> None:
    if not ok:
        raise ConversionError(f"{arch} cannot represent this model: {what}")


def _check_fits(d: GPTDescription, arch: str) -> None:
    _require(d.multi_latent_attention == (arch == DEEPSEEK), arch,
             "needs multi-latent attention" if arch == DEEPSEEK
             else "has no multi-latent attention (DeepseekV3ForCausalLM has)")
    _require(not d.mtp_num_layers or arch == DEEPSEEK, arch, f"mtp_num_layers "
             f"{d.mtp_num_layers}: it stores no multi-token-prediction layers "
             "(DeepseekV3ForCausalLM does: num_nextn_predict_layers)")
    if arch == "GPT2LMHeadModel":
        _require(d.normalization == "LayerNorm", arch, "needs LayerNorm")
        _require(d.position_embedding_type == "learned_absolute", arch,
                 "needs learned absolute positions")
        _require(d.add_bias_linear and not d.gated_linear_unit, arch,
                 "needs biases and a non-gated MLP")
        _require(d.num_query_groups == d.num_attention_heads, arch, "needs multi-head attention")
        _require(d.kv_channels * d.num_attention_heads == d.hidden_size, arch,
                 "needs kv_channels * heads == hidden_size")
        _require(d.activation in _TO_HF_ACT, arch, f"activation {d.activation}")
        _require(not d.qk_layernorm, arch, "has no q/k layernorm")
        _require(d.window_size is None, arch, "has no sliding-window attention")
    else:
        _check_llama_family(d, arch)
    moe = arch in _MOE_ARCHS
    _require(d.is_moe == moe, arch, f"MoE only in {_MOE_ARCHS}" if d.is_moe
             else f"{arch} needs num_moe_experts")
    if moe:
        _check_routing(d, arch)


def _check_routing(d: GPTDescription, arch: str) -> None:
    """What each MoE architecture's router and layer pattern can express."""
    _require(not d.moe_shared_expert_gate, arch, "has no shared-expert gate")
    if arch == DEEPSEEK:
        _require(d.moe_router_score_function == "sigmoid" and d.moe_router_enable_expert_bias
                 and not d.moe_router_pre_softmax, arch,
                 "needs sigmoid routing with an expert bias (moe_router_score_function "
                 "'sigmoid', moe_router_enable_expert_bias)")
        shared = d.moe_shared_expert_intermediate_size or 0
        _require(shared % d.expert_ffn_hidden_size == 0, arch, f"shared experts of width "
                 f"{shared}, not a multiple of moe_ffn_hidden_size {d.expert_ffn_hidden_size}")
        k = _first_dense_layers(d)
        _require(k is not None, arch, "dense layers must be the first ones "
                 "(first_k_dense_replace); moe_layer_freq " f"{d.moe_layer_freq!r}")
        if d.moe_router_num_groups is not None:
            _check_group_topk(d.moe_router_topk, d.moe_router_group_topk, arch)
        return
    _require(all(d.is_moe_layer(i) for i in range(d.num_layers)) or arch == QWEN3_MOE, arch,
             "needs MoE in every layer")
    _require(d.moe_router_score_function == "softmax" and d.moe_router_num_groups is None
             and d.moe_router_topk_scaling_factor in (None, 1.0)
             and not d.moe_router_enable_expert_bias, arch, "routes by a plain top-k softmax "
             "(no sigmoid, groups, scaling factor or expert bias)")
    _require(not d.moe_shared_expert_intermediate_size, arch, "has no shared experts")
    _require(not d.moe_router_pre_softmax or arch == QWEN3_MOE, arch,
             "renormalizes its top-k (no moe_router_pre_softmax)")


def _check_group_topk(topk: int, group_topk: int, where: str) -> None:
    _require(topk == 2 * group_topk, where, f"transformers scores an expert group by its best "
             f"2 experts, megacore by its best topk // group_topk = {topk} // {group_topk}: "
             "they agree only when num_experts_per_tok == 2 * topk_group")


def _first_dense_layers(d: GPTDescription):
    """``k`` when exactly the first ``k`` layers are dense, else None."""
    pattern = [d.is_moe_layer(i) for i in range(d.num_layers)]
    k = pattern.index(True) if True in pattern else d.num_layers
    return k if all(pattern[k:]) else None


def _check_llama_family(d: GPTDescription, arch: str) -> None:
    _require(d.normalization == "RMSNorm", arch, "needs RMSNorm")
    _require(d.position_embedding_type == "rope" and d.rotary_percent == 1.0, arch,
             "needs full RoPE")
    _require(not d.add_bias_linear, arch, "has no biases in its linear layers")
    qwen2, qwen3 = arch == "Qwen2ForCausalLM", arch in ("Qwen3ForCausalLM", QWEN3_MOE)
    _require(d.add_qkv_bias == qwen2, arch, "needs q/k/v biases (add_qkv_bias)" if qwen2
             else "has no q/k/v biases (Qwen2ForCausalLM has)")
    _require(d.qk_layernorm == qwen3, arch, "needs per-head q/k norms (qk_layernorm)" if qwen3
             else "has no q/k norms (Qwen3ForCausalLM has)")
    _require(not (d.qk_layernorm and d.rotary_interleaved), arch,
             "q/k norms with interleaved RoPE")
    _require(d.gated_linear_unit and d.activation == "silu", arch, "needs SwiGLU")
    if d.window_size is not None:
        _require(arch in _WINDOWED, arch, f"has no sliding window (window_size "
                 f"{d.window_size}; MistralForCausalLM has one)")
        left, right = d.window_size
        _require(left >= 0 and right == 0, arch, f"window_size {d.window_size}: a Mistral "
                 "sliding window is (w - 1, 0)")


def mapping_groups(d: GPTDescription, architecture: str) -> List[MappingGroup]:
    """The groups of ``architecture`` for ``d``, in module order.

    Raises:
        ConversionError: the architecture cannot hold this model (the message says why).
    """
    if architecture not in HF_ARCHITECTURES:
        raise ConversionError(f"unsupported Hugging Face architecture {architecture!r}; "
                              f"supported: {HF_ARCHITECTURES}")
    _check_fits(d, architecture)
    if architecture == "GPT2LMHeadModel":
        return _gpt2_groups(d)
    return _llama_groups(d, architecture)


def choose_architecture(d: GPTDescription) -> str:
    """GPT-2 for LayerNorm + learned positions, DeepSeek-V3 for multi-latent attention,
    Qwen3-MoE for MoE with q/k norms, Mixtral for other MoE, Qwen3 with q/k norms, Qwen2
    with q/k/v biases, Mistral with a sliding window, else Llama."""
    if d.normalization == "LayerNorm" and d.position_embedding_type == "learned_absolute":
        return "GPT2LMHeadModel"
    if d.multi_latent_attention:
        return DEEPSEEK
    if d.is_moe:
        return QWEN3_MOE if d.qk_layernorm else "MixtralForCausalLM"
    if d.qk_layernorm:
        return "Qwen3ForCausalLM"
    if d.add_qkv_bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if d.window_size is not None else "LlamaForCausalLM"


# -- config.json ---------------------------------------------------------------------------
def _rope_fields(cfg: Dict[str, Any], arch: str) -> Dict[str, Any]:
    """Description fields of ``rope_theta`` and ``rope_parameters`` (transformers 5) or
    ``rope_scaling`` (older files): the ``default`` and ``llama3`` types, and ``yarn``
    for DeepSeek-V3."""
    field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = cfg.get(field) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if kind in (None, "default"):
        return dict(rotary_base=theta)
    if kind == "yarn" and arch == DEEPSEEK:
        return dict(rotary_base=theta, **_yarn_fields(cfg, params, field))
    if kind != "llama3":
        raise ConversionError(f"config.json {field}.rope_type {kind!r} is not supported for "
                              f"{arch} (supported: 'default', 'llama3' = --use-rope-scaling, "
                              f"and 'yarn' = --rope-type yarn for {DEEPSEEK})")
    try:
        return dict(rotary_base=theta, rope_scaling=True,
                    rope_scaling_factor=float(params["factor"]),
                    rope_scaling_low_freq_factor=float(params["low_freq_factor"]),
                    rope_scaling_high_freq_factor=float(params["high_freq_factor"]),
                    rope_scaling_original_max_position_embeddings=int(
                        params["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConversionError(f"config.json {field} of type 'llama3' lacks {e}") from None


def _yarn_fields(cfg: Dict[str, Any], params: Dict[str, Any], field: str) -> Dict[str, Any]:
    """MLA config fields of a ``yarn`` rope type, as transformers reads it (a missing
    ``factor`` is ``max_position_embeddings / original_max_position_embeddings``)."""
    if params.get("attention_factor") is not None:
        raise ConversionError(f"config.json {field}.attention_factor: an explicit YaRN cos/sin "
                              "factor is not supported (megacore derives it from mscale and "
                              "mscale_all_dim)")
    if params.get("truncate", True) is not True:
        raise ConversionError(f"config.json {field}.truncate false: megacore's YaRN rounds "
                              "the ramp ends (--yarn-correction-range-round-to-int)")
    if "original_max_position_embeddings" not in params:
        raise ConversionError(f"config.json {field} of type 'yarn' lacks "
                              "'original_max_position_embeddings'")
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or cfg.get("max_position_embeddings", 2048) / original
    return dict(rope_type="yarn", rotary_scaling_factor=float(factor),
                original_max_position_embeddings=original,
                beta_fast=float(params.get("beta_fast") or 32),
                beta_slow=float(params.get("beta_slow") or 1),
                mscale=float(params.get("mscale") or 0.0),
                mscale_all_dim=float(params.get("mscale_all_dim") or 0.0))


def _rope_parameters(d: GPTDescription) -> Dict[str, Any]:
    params = {"rope_type": "default", "rope_theta": float(d.rotary_base)}
    if d.rope_type == "yarn":
        params.update(rope_type="yarn", factor=float(d.rotary_scaling_factor),
                      original_max_position_embeddings=int(d.original_max_position_embeddings),
                      beta_fast=float(d.beta_fast), beta_slow=float(d.beta_slow),
                      mscale=float(d.mscale), mscale_all_dim=float(d.mscale_all_dim))
    if d.rope_scaling:
        params.update(rope_type="llama3", factor=float(d.rope_scaling_factor),
                      low_freq_factor=float(d.rope_scaling_low_freq_factor),
                      high_freq_factor=float(d.rope_scaling_high_freq_factor),
                      original_max_position_embeddings=int(
                          d.rope_scaling_original_max_position_embeddings))
    return params


def _window_fields(cfg: Dict[str, Any], arch: str) -> Dict[str, Any]:
    """Mistral/Mixtral ``sliding_window = w`` (keys ``i - w + 1 .. i``) -> ``(w - 1, 0)``;
    Qwen's per-layer windows are refused."""
    if cfg.get("use_sliding_window"):
        raise ConversionError(f"config.json use_sliding_window: {arch}'s per-layer sliding "
                              "windows are not supported")
    window = cfg.get("sliding_window") if arch in _WINDOWED else None
    if window is None:
        return {}
    if not isinstance(window, int) or window < 1:
        raise ConversionError(f"config.json sliding_window must be a positive integer, got "
                              f"{window!r}")
    return dict(window_size=(window - 1, 0))


def _dtype_name(cfg: Dict[str, Any]) -> str:
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")


def description_from_hf_config(cfg: Dict[str, Any]) -> GPTDescription:
    """A :class:`GPTDescription` from a ``config.json`` dict (architecture from
    ``architectures[0]``)."""
    arch = (cfg.get("architectures") or [None])[0]
    if arch == "GPT2LMHeadModel":
        act = cfg.get("activation_function", "gelu_new")
        if act not in _HF_ACT:
            raise ConversionError(f"GPT-2 activation {act!r} has no megacore equivalent")
        h = cfg["n_embd"]
        return GPTDescription(
            num_layers=cfg["n_layer"], hidden_size=h, num_attention_heads=cfg["n_head"],
            vocab_size=cfg["vocab_size"], ffn_hidden_size=cfg.get("n_inner") or 4 * h,
            max_position_embeddings=cfg["n_positions"], normalization="LayerNorm",
            layernorm_epsilon=cfg.get("layer_norm_epsilon", 1e-5), add_bias_linear=True,
            activation=_HF_ACT[act], position_embedding_type="learned_absolute",
            share_embeddings_and_output_weights=cfg.get("tie_word_embeddings", True),
            params_dtype=_dtype_name(cfg))
    if arch not in HF_ARCHITECTURES:
        raise ConversionError(f"unsupported Hugging Face architecture {arch!r}; supported: "
                              f"{HF_ARCHITECTURES}")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            raise ConversionError(f"config.json {field}: {arch} with biases there is not "
                                  "supported")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ConversionError(f"{arch} activation {cfg.get('hidden_act')!r} is not supported")
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kw = dict(
        num_layers=cfg["num_hidden_layers"], hidden_size=h, num_attention_heads=heads,
        vocab_size=cfg["vocab_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or h // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        position_embedding_type="rope", normalization="RMSNorm",
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6), add_bias_linear=False,
        gated_linear_unit=True, activation="silu",
        share_embeddings_and_output_weights=cfg.get("tie_word_embeddings", False),
        add_qkv_bias=arch == "Qwen2ForCausalLM",
        qk_layernorm=arch in ("Qwen3ForCausalLM", QWEN3_MOE),
        **_rope_fields(cfg, arch), **_window_fields(cfg, arch), params_dtype=_dtype_name(cfg))
    if arch == "MixtralForCausalLM":
        kw.update(num_moe_experts=cfg["num_local_experts"],
                  moe_ffn_hidden_size=cfg["intermediate_size"],
                  moe_router_topk=cfg.get("num_experts_per_tok", 2))
    elif arch == QWEN3_MOE:
        kw.update(_qwen3_moe_fields(cfg))
    elif arch == DEEPSEEK:
        kw.update(_deepseek_fields(cfg))
    return GPTDescription(**kw)


def _field(cfg: Dict[str, Any], name: str, arch: str):
    if cfg.get(name) is None:
        raise ConversionError(f"config.json of {arch} lacks {name!r}")
    return cfg[name]


def _qwen3_moe_fields(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Experts, top-k normalization and the dense-layer pattern (a layer is MoE unless in
    ``mlp_only_layers``, and only every ``decoder_sparse_step``-th layer is)."""
    experts = cfg.get("num_experts") or _field(cfg, "num_local_experts", QWEN3_MOE)
    step, dense = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or [])
    pattern = [int(i not in dense and (i + 1) % step == 0)
               for i in range(cfg["num_hidden_layers"])]
    return dict(num_moe_experts=int(experts),
                moe_ffn_hidden_size=_field(cfg, "moe_intermediate_size", QWEN3_MOE),
                moe_router_topk=int(cfg.get("num_experts_per_tok", 2)), moe_layer_freq=pattern,
                moe_router_pre_softmax=not cfg.get("norm_topk_prob", False))


def _deepseek_fields(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Multi-latent attention, DeepSeek's router and the first-k-dense layer pattern."""
    arch, heads, layers = DEEPSEEK, cfg["num_attention_heads"], cfg["num_hidden_layers"]
    if (cfg.get("num_key_value_heads") or heads) != heads:
        raise ConversionError(f"config.json num_key_value_heads {cfg['num_key_value_heads']}: "
                              f"{arch}'s multi-latent attention has one key per head ({heads})")
    for name, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if cfg.get(name, want) != want:
            raise ConversionError(f"config.json {name} {cfg[name]!r} is not supported "
                                  f"(only {want!r}, as transformers' {arch} routes)")
    topk = int(_field(cfg, "num_experts_per_tok", arch))
    if bool(cfg.get("norm_topk_prob", True)) != (topk > 1):
        raise ConversionError(f"config.json norm_topk_prob {cfg.get('norm_topk_prob')} with "
                              f"num_experts_per_tok {topk}: megacore's sigmoid router "
                              "normalizes the top-k exactly when k > 1")
    groups, group_topk = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    if groups != group_topk:  # equal: every group is kept, no limit
        _check_group_topk(topk, group_topk, "config.json num_experts_per_tok / topk_group")
    experts = int(_field(cfg, "n_routed_experts", arch))
    dense = min(int(cfg.get("first_k_dense_replace") or 0), layers)
    moe_width = _field(cfg, "moe_intermediate_size", arch)
    shared = int(cfg.get("n_shared_experts") or 0)
    q_lora = cfg.get("q_lora_rank")
    mtp = int(cfg.get("num_nextn_predict_layers") or 0)
    return dict(
        mtp_num_layers=mtp or None, num_query_groups=heads, multi_latent_attention=True,
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(_field(cfg, "kv_lora_rank", arch)),
        qk_head_dim=int(_field(cfg, "qk_nope_head_dim", arch)),
        qk_pos_emb_head_dim=int(_field(cfg, "qk_rope_head_dim", arch)),
        v_head_dim=int(_field(cfg, "v_head_dim", arch)),
        rotary_interleaved=bool(cfg.get("rope_interleave", True)),
        num_moe_experts=experts, moe_ffn_hidden_size=moe_width, moe_router_topk=topk,
        moe_layer_freq=[0] * dense + [1] * (layers - dense),
        moe_shared_expert_intermediate_size=shared * moe_width if shared else None,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_num_groups=groups if groups != group_topk else None,
        moe_router_group_topk=group_topk if groups != group_topk else None,
        moe_router_topk_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0))


def hf_config_from_description(d: GPTDescription, architecture: str) -> Dict[str, Any]:
    """A ``config.json`` dict for ``architecture`` describing ``d``."""
    _check_fits(d, architecture)
    dtype = d.params_dtype
    if architecture == "GPT2LMHeadModel":
        return {"architectures": [architecture], "model_type": "gpt2",
                "vocab_size": d.vocab_size, "n_positions": d.max_position_embeddings,
                "n_embd": d.hidden_size, "n_layer": d.num_layers,
                "n_head": d.num_attention_heads, "n_inner": d.ffn_hidden_size,
                "activation_function": _TO_HF_ACT[d.activation],
                "layer_norm_epsilon": d.layernorm_epsilon,
                "tie_word_embeddings": d.share_embeddings_and_output_weights,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "torch_dtype": dtype}
    cfg = {"architectures": [architecture], "model_type": _MODEL_TYPES[architecture],
           "vocab_size": d.vocab_size, "hidden_size": d.hidden_size,
           "intermediate_size": d.expert_ffn_hidden_size if d.is_moe else d.ffn_hidden_size,
           "num_hidden_layers": d.num_layers, "num_attention_heads": d.num_attention_heads,
           "num_key_value_heads": d.num_query_groups, "head_dim": d.kv_channels,
           "hidden_act": "silu", "max_position_embeddings": d.max_position_embeddings,
           "rms_norm_eps": d.layernorm_epsilon, "rope_theta": float(d.rotary_base),
           "rope_parameters": _rope_parameters(d),
           "tie_word_embeddings": d.share_embeddings_and_output_weights,
           "attention_dropout": 0.0, "torch_dtype": dtype}
    if architecture != "Qwen2ForCausalLM":  # Qwen2's q/k/v biases are not configurable
        cfg["attention_bias"] = False
    if architecture == "LlamaForCausalLM":
        cfg["mlp_bias"] = False
    if architecture in _WINDOWED:
        cfg["sliding_window"] = d.window_size[0] + 1 if d.window_size else None
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", QWEN3_MOE):
        cfg.update(use_sliding_window=False, sliding_window=None)
    if architecture == "MixtralForCausalLM":
        cfg.update(num_local_experts=d.num_moe_experts, num_experts_per_tok=d.moe_router_topk,
                   output_router_logits=False, router_jitter_noise=0.0)
    if architecture == QWEN3_MOE:
        cfg.update(intermediate_size=d.ffn_hidden_size, num_experts=d.num_moe_experts,
                   moe_intermediate_size=d.expert_ffn_hidden_size,
                   num_experts_per_tok=d.moe_router_topk, decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(d.num_layers) if not d.is_moe_layer(i)],
                   norm_topk_prob=not d.moe_router_pre_softmax, output_router_logits=False)
    if architecture == DEEPSEEK:
        cfg.update(_deepseek_config(d))
    return cfg


def _deepseek_config(d: GPTDescription) -> Dict[str, Any]:
    shared = (d.moe_shared_expert_intermediate_size or 0) // d.expert_ffn_hidden_size
    grouped = d.moe_router_num_groups is not None
    return dict(
        intermediate_size=d.ffn_hidden_size, head_dim=d.qk_pos_emb_head_dim,
        q_lora_rank=d.q_lora_rank, kv_lora_rank=d.kv_lora_rank,
        qk_nope_head_dim=d.qk_head_dim, qk_rope_head_dim=d.qk_pos_emb_head_dim,
        qk_head_dim=d.qk_head_dim + d.qk_pos_emb_head_dim, v_head_dim=d.v_head_dim,
        rope_interleave=d.rotary_interleaved, n_routed_experts=d.num_moe_experts,
        moe_intermediate_size=d.expert_ffn_hidden_size, n_shared_experts=shared,
        num_experts_per_tok=d.moe_router_topk, norm_topk_prob=d.moe_router_topk > 1,
        n_group=d.moe_router_num_groups if grouped else 1,
        topk_group=d.moe_router_group_topk if grouped else 1,
        routed_scaling_factor=float(d.moe_router_topk_scaling_factor or 1.0),
        first_k_dense_replace=_first_dense_layers(d),
        num_nextn_predict_layers=d.mtp_num_layers or 0,
        output_router_logits=False)

