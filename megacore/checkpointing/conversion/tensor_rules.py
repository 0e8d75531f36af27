"""Canonical tensor names, how each is split over tp, and where it lives in a layout.

A *canonical* tensor is a model tensor as the single-process model holds it (tp=pp=ep=1)
under its global name (``sharded_state``'s naming, also the torch_dist keys without the
``model/`` prefix):

* layers by global index: ``decoder.layers.<L>.<suffix>``;
* routed experts by global index: ``...mlp.experts.local_experts.<E>.linear_fc1.weight``,
  or for stacked (grouped-GEMM) experts one tensor per expert:
  ``...mlp.experts.weight1/expert<E>`` (``[h, F1]``, the expert's slice of ``[El, h, F1]``);
* the fused QKV in the logical row layout (``transformer.qkv_layout``);
* vocabulary rows unpadded (``V``); a tied output layer is not a tensor of its own;
* multi-token prediction depth ``i`` (0-based): ``mtp.layers.<i>.{enorm, hnorm, eh_proj,
  final_layernorm}.*`` and its transformer layer ``mtp.layers.<i>.transformer_layer.<suffix>``
  (suffixes and splits as a decoder layer's), on the last pipeline stage; with pp > 1 that
  stage also holds a copy of the word embedding (``GPTModel.mtp_process``), which is the
  same canonical tensor.

Optimizer state is canonical too: ``optimizer/<field>/<name>``, shaped and split like the
param (0-dim ``step`` replicated).

:class:`ShardRule` says how a canonical tensor is cut for tp ``t``: ``tp_dim``,
``stride`` (``t * stride`` blocks, rank ``r`` keeps ``r, r + t, ...``, as
``tensor_parallel.layers`` does), replicated k/v rows when ``ng < t``, vocabulary padding
to a multiple of ``t``. :class:`MegacoreLayout` says which rank file holds it and under
which local name (pipeline stage by layer, ep rank by expert).

Worked example (4 layers, 4 experts, tp=2, pp=2, ep=2): ``decoder.layers.3.mlp.experts.
local_experts.2.linear_fc1.weight`` lives in files ``mp_rank_0{0,1}_001_001`` (tp ranks
0 and 1, pp rank 1, ep rank 1) as ``decoder.layers.1.mlp.experts.local_experts.0.
linear_fc1.weight``, rows cut in 4 blocks (stride 2: ``[gate; up]``), tp rank 0 holding
blocks 0 and 2.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Tuple

import torch

from megacore.checkpointing.conversion.model_description import GPTDescription
from megacore.checkpointing.errors import CheckpointError
from megacore.pipeline_parallel.layer_split import get_layer_offset_and_count
from megacore.tensor_parallel.layers import _shard_master_weight
from megacore.transformer.qkv_layout import collapse_qkv_rows, expand_qkv_rows
from megacore.vocab_padding import pad_vocab_size

__all__ = ["ShardRule", "shard_rule", "canonical_sort_key", "MegacoreLayout", "Location",
           "split_for_tp", "merge_from_tp", "WORD_EMBEDDING", "OUTPUT_LAYER", "model_key",
           "optimizer_key", "parse_key", "expected_model_names", "layer_index", "expert_index"]

WORD_EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SEQ_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_STACKED_EXPERT = re.compile(r"^mlp\.experts\.(weight1|weight2|bias1|bias2)/expert(\d+)$")
_STACKED_LOCAL = re.compile(r"^mlp\.experts\.(weight1|weight2|bias1|bias2)$")  # layer suffix
_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
_MTP_LAYER = "transformer_layer."


def model_key(name: str) -> str:
    return f"model/{name}"


def optimizer_key(field: str, name: str) -> str:
    return f"optimizer/{field}/{name}"


def parse_key(key: str) -> Tuple[Optional[str], str]:
    """``(optimizer field or None, canonical name)`` of a canonical key."""
    if key.startswith("model/"):
        return None, key[len("model/"):]
    _, field, name = key.split("/", 2)
    return field, name


@dataclasses.dataclass(frozen=True)
class ShardRule:
    """How a canonical tensor is split over tp (see the module docstring).

    Attributes:
        tp_dim: split dim, None when replicated over tp.
        gated_stride: stride 2 when the model is gated (fc1 of a gated MLP), else 1.
        qkv: the fused QKV (k/v rows replicated when ``ng < tp``).
        vocab: dim 0 is the vocabulary (padded to a multiple of tp).
        expert: a routed expert's tensor (split over expert-tp, placed by ep).
        order: position in module order (sorting key inside a layer).
    """

    tp_dim: Optional[int] = None
    gated_stride: bool = False
    qkv: bool = False
    vocab: bool = False
    expert: bool = False
    order: int = 0

    def stride(self, desc: GPTDescription) -> int:
        return 2 if self.gated_stride and desc.gated_linear_unit else 1


_REPL, _ROW = dict(), dict(tp_dim=1)
_FC1 = dict(tp_dim=0, gated_stride=True)
# Suffixes inside a dense layer, in module order (the order matters for the optimizer's
# param groups, which follow named_parameters order).
_LAYER_RULES: List[Tuple[str, dict]] = [
    ("input_layernorm.weight", _REPL), ("input_layernorm.bias", _REPL),
    ("self_attention.linear_qkv.weight", dict(tp_dim=0, qkv=True)),
    ("self_attention.linear_qkv.bias", dict(tp_dim=0, qkv=True)),
    # Multi-latent attention: replicated down-projections and latent norm, up-projections
    # column-parallel over heads (rows head-major).
    ("self_attention.linear_q_proj.weight", dict(tp_dim=0)),
    ("self_attention.linear_q_down_proj.weight", _REPL),
    ("self_attention.linear_q_up_proj.weight", dict(tp_dim=0)),
    ("self_attention.linear_kv_down_proj.weight", _REPL),
    ("self_attention.kv_layernorm.weight", _REPL),
    ("self_attention.linear_kv_up_proj.weight", dict(tp_dim=0)),
    ("self_attention.linear_proj.weight", _ROW), ("self_attention.linear_proj.bias", _REPL),
    ("self_attention.q_layernorm.weight", _REPL), ("self_attention.q_layernorm.bias", _REPL),
    ("self_attention.k_layernorm.weight", _REPL), ("self_attention.k_layernorm.bias", _REPL),
    ("pre_mlp_layernorm.weight", _REPL), ("pre_mlp_layernorm.bias", _REPL),
    ("mlp.linear_fc1.weight", _FC1), ("mlp.linear_fc1.bias", _FC1),
    ("mlp.linear_fc2.weight", _ROW), ("mlp.linear_fc2.bias", _REPL),
    ("mlp.router.weight", _REPL), ("mlp.router.expert_bias", _REPL),
    ("<experts>", _REPL),
    ("mlp.shared_experts.mlp.linear_fc1.weight", _FC1),
    ("mlp.shared_experts.mlp.linear_fc1.bias", _FC1),
    ("mlp.shared_experts.mlp.linear_fc2.weight", _ROW),
    ("mlp.shared_experts.mlp.linear_fc2.bias", _REPL),
    ("mlp.shared_experts.gate_weight", _REPL),
]
_LAYER_TABLE = {suffix: ShardRule(order=i, **kw) for i, (suffix, kw) in enumerate(_LAYER_RULES)}
_EXPERT_ORDER = _LAYER_TABLE["<experts>"].order
_EXPERT_RULES = {  # inside local_experts.<E>.
    "linear_fc1.weight": ShardRule(tp_dim=0, gated_stride=True, expert=True, order=0),
    "linear_fc1.bias": ShardRule(tp_dim=0, gated_stride=True, expert=True, order=1),
    "linear_fc2.weight": ShardRule(tp_dim=1, expert=True, order=2),
    "linear_fc2.bias": ShardRule(expert=True, order=3),
}
_STACKED_RULES = {  # per-expert slices of GroupedMLP's stacked params
    "weight1": ShardRule(tp_dim=1, gated_stride=True, expert=True, order=0),  # [h, F1]
    "weight2": ShardRule(tp_dim=0, expert=True, order=1),                     # [f, h]
    "bias1": ShardRule(tp_dim=0, gated_stride=True, expert=True, order=2),    # [F1]
    "bias2": ShardRule(expert=True, order=3),                                 # [h]
}
_TOP_RULES = {
    WORD_EMBEDDING: ShardRule(tp_dim=0, vocab=True, order=0),
    "embedding.position_embeddings.weight": ShardRule(order=1),
    "decoder.final_layernorm.weight": ShardRule(order=2),
    "decoder.final_layernorm.bias": ShardRule(order=3),
    OUTPUT_LAYER: ShardRule(tp_dim=0, vocab=True, order=4),
}


_MTP_TOP_RULES = {  # inside mtp.layers.<i>., in module order (transformer_layer between)
    "enorm.weight": ShardRule(order=0), "enorm.bias": ShardRule(order=1),
    "hnorm.weight": ShardRule(order=2), "hnorm.bias": ShardRule(order=3),
    "eh_proj.weight": ShardRule(tp_dim=0, order=4),  # column-parallel [h, 2h]
    "final_layernorm.weight": ShardRule(order=1000),
    "final_layernorm.bias": ShardRule(order=1001),
}
_MTP_LAYER_ORDER = 100  # transformer_layer suffixes sort between eh_proj and the final norm


def _layer_parts(name: str) -> Optional[Tuple[str, int, str]]:
    """``(kind, index, layer suffix)`` of a transformer layer's tensor: kind ``decoder``
    (global layer index) or ``mtp`` (depth index); None for other names."""
    match = _LAYER.match(name)
    if match:
        return "decoder", int(match.group(1)), match.group(2)
    match = _MTP.match(name)
    if match and match.group(2).startswith(_MTP_LAYER):
        return "mtp", int(match.group(1)), match.group(2)[len(_MTP_LAYER):]
    return None


def shard_rule(name: str) -> Optional[ShardRule]:
    """The rule of a canonical model tensor name, or None for a name megacore's GPT does
    not have (the manifest reports those)."""
    if name in _TOP_RULES:
        return _TOP_RULES[name]
    parts = _layer_parts(name)
    if parts is None:
        match = _MTP.match(name)
        return _MTP_TOP_RULES.get(match.group(2)) if match else None
    suffix = parts[2]
    expert = _SEQ_EXPERT.match(suffix)
    if expert:
        return _EXPERT_RULES.get(expert.group(2))
    stacked = _STACKED_EXPERT.match(suffix)
    if stacked:
        return _STACKED_RULES[stacked.group(1)]
    return None if suffix == "<experts>" else _LAYER_TABLE.get(suffix)


def expert_index(name: str) -> Optional[int]:
    """Global expert index of a canonical routed-expert tensor name."""
    parts = _layer_parts(name)
    if parts is None:
        return None
    for pattern, group in ((_SEQ_EXPERT, 1), (_STACKED_EXPERT, 2)):
        found = pattern.match(parts[2])
        if found:
            return int(found.group(group))
    return None


def layer_index(name: str) -> Optional[int]:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def canonical_sort_key(name: str) -> Tuple:
    """Module order: embedding, layers (in layer order, each in module order, experts by
    index), final norm, output layer, multi-token prediction depths."""
    rule = shard_rule(name)
    order = rule.order if rule is not None else 99
    mtp = _MTP.match(name)
    if mtp:
        depth, parts = int(mtp.group(1)), _layer_parts(name)
        if parts is None:
            return (3, depth, order, 0, 0, name)
        expert = expert_index(name)
        if expert is not None:
            return (3, depth, _MTP_LAYER_ORDER + _EXPERT_ORDER, expert, order, name)
        return (3, depth, _MTP_LAYER_ORDER + order, 0, 0, name)
    layer = layer_index(name)
    if layer is None:
        section = 0 if name.startswith("embedding.") else 2
        return (section, 0, order, 0, 0, name)
    expert = expert_index(name)
    if expert is not None:
        return (1, layer, _EXPERT_ORDER, expert, order, name)
    return (1, layer, order, 0, 0, name)


# -- tp split and merge -------------------------------------------------------------------
def _qkv_kw(desc: GPTDescription, tp: int) -> dict:
    return dict(num_attention_heads=desc.num_attention_heads,
                num_query_groups=desc.num_query_groups, kv_channels=desc.kv_channels,
                tp_size=tp)


def split_for_tp(full: torch.Tensor, rule: ShardRule, desc: GPTDescription,
                 tp: int) -> List[torch.Tensor]:
    """The tp shards (contiguous) of a canonical tensor; replicated tensors repeat."""
    if full.dim() == 0 or rule.tp_dim is None:
        return [full] * tp
    if rule.vocab:
        rows = pad_vocab_size(desc.vocab_size, tensor_model_parallel_size=tp)
        if full.shape[0] != rows:  # [V, h] -> [V_padded(tp), h], zero rows
            padded = full.new_zeros((rows,) + tuple(full.shape[1:]))
            padded[:min(rows, full.shape[0])] = full[:rows]
            full = padded
    if rule.qkv:
        full = expand_qkv_rows(full, **_qkv_kw(desc, tp))
    stride = rule.stride(desc)
    return [_shard_master_weight(full, rule.tp_dim, stride, r, tp).contiguous()
            for r in range(tp)]


def merge_from_tp(shards: List[torch.Tensor], rule: ShardRule, desc: GPTDescription,
                  name: str) -> torch.Tensor:
    """Inverse of :func:`split_for_tp`. Replicas (replicated tensors, k/v rows) must be
    bitwise equal: a difference means the checkpoint is not what its config says."""
    tp = len(shards)
    if shards[0].dim() == 0 or rule.tp_dim is None:
        _check_replicas(shards, name)
        return shards[0]
    stride = rule.stride(desc)
    if stride == 1:
        full = torch.cat(shards, dim=rule.tp_dim)
    else:  # rank r holds blocks r, r + tp, ...: block j of every rank forms 1/stride
        parts = [s.chunk(stride, dim=rule.tp_dim) for s in shards]
        full = torch.cat([parts[r][j] for j in range(stride) for r in range(tp)],
                         dim=rule.tp_dim)
    if rule.qkv and desc.num_query_groups < tp:
        collapsed = collapse_qkv_rows(full, **_qkv_kw(desc, tp))
        _check_replicas([full, expand_qkv_rows(collapsed, **_qkv_kw(desc, tp))], name)
        full = collapsed
    if rule.vocab:
        full = full[:desc.vocab_size]
    return full.contiguous()


def _check_replicas(copies: List[torch.Tensor], name: str) -> None:
    for i, other in enumerate(copies[1:], start=1):
        if not torch.equal(copies[0], other):
            raise CheckpointError(f"{name}: copy {i} differs from copy 0 although the layout "
                                  "replicates it; the checkpoint is inconsistent")


# -- layouts ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Location:
    """Where a canonical tensor sits in one layout.

    Attributes:
        pp_rank, chunk: pipeline stage and model chunk (virtual stage).
        ep_ranks: ep ranks whose files hold it (all for non-expert tensors).
        local_name: name in that chunk's state dict.
        stack_slot: for a stacked-experts param, the expert's index along dim 0.
    """

    pp_rank: int
    chunk: int
    ep_ranks: Tuple[int, ...]
    local_name: str
    stack_slot: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class MegacoreLayout:
    """A model-parallel layout of megacore rank files.

    Attributes:
        tp, pp, ep: degrees (the legacy format needs expert-tp == tp).
        vpp: model chunks per pipeline rank (None: 1).
        first_stage_layers, last_stage_layers: uneven pipeline split (None: even).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    vpp: Optional[int] = None
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None

    def __post_init__(self):
        for field in ("tp", "pp", "ep"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")

    @property
    def num_chunks(self) -> int:
        return self.vpp or 1

    def check(self, desc: GPTDescription) -> None:
        """Raise ValueError when ``desc`` cannot be laid out like this."""
        if desc.num_attention_heads % self.tp:
            raise ValueError(f"num_attention_heads ({desc.num_attention_heads}) is not "
                             f"divisible by target tp ({self.tp})")
        ng = desc.num_query_groups
        if ng % self.tp and self.tp % ng:
            raise ValueError(f"num_query_groups ({ng}) and target tp ({self.tp}) must divide "
                             "one another")
        if desc.is_moe and desc.num_moe_experts % self.ep:
            raise ValueError(f"num_moe_experts ({desc.num_moe_experts}) is not divisible by "
                             f"target ep ({self.ep})")
        if not desc.is_moe and self.ep != 1:
            raise ValueError(f"target ep={self.ep} needs an MoE model")
        self.stage_of_layer(desc, 0)  # validates the layer split

    def layer_range(self, desc: GPTDescription, pp_rank: int, chunk: int) -> Tuple[int, int]:
        """``(offset, count)`` of a (pipeline rank, chunk)."""
        return get_layer_offset_and_count(desc.num_layers, self.pp, pp_rank, self.vpp,
                                          chunk if self.vpp else None,
                                          self.first_stage_layers, self.last_stage_layers)

    def stage_of_layer(self, desc: GPTDescription, layer: int) -> Tuple[int, int, int]:
        """``(pp_rank, chunk, local index)`` of a global layer."""
        for chunk in range(self.num_chunks):
            for pp_rank in range(self.pp):
                offset, count = self.layer_range(desc, pp_rank, chunk)
                if offset <= layer < offset + count:
                    return pp_rank, chunk, layer - offset
        raise ValueError(f"layer {layer} is outside the model ({desc.num_layers} layers)")

    def locate(self, name: str, desc: GPTDescription) -> Location:
        """Where canonical ``name`` lives (for a tied output layer ask for
        ``output_layer.weight`` explicitly)."""
        all_ep = tuple(range(self.ep))
        if name.startswith("embedding."):
            return Location(0, 0, all_ep, name)
        last = (self.pp - 1, self.num_chunks - 1)
        if name.startswith("decoder.final_layernorm") or name == OUTPUT_LAYER:
            return Location(*last, all_ep, name)
        parts = _layer_parts(name)
        if parts is None and _MTP.match(name):
            return Location(*last, all_ep, name)  # an MTP depth's norms and eh_proj
        if parts is None:
            raise ValueError(f"{name!r} is not a GPT tensor name")
        kind, index, suffix = parts
        if kind == "mtp":  # the depths live on the last stage under their own names
            pp_rank, chunk, prefix = *last, name[:len(name) - len(suffix)]
        else:
            pp_rank, chunk, local_layer = self.stage_of_layer(desc, index)
            prefix = f"decoder.layers.{local_layer}."
        expert = expert_index(name)
        if expert is None:
            return Location(pp_rank, chunk, all_ep, prefix + suffix)
        n_local = desc.num_moe_experts // self.ep
        ep_rank, slot = divmod(expert, n_local)
        seq = _SEQ_EXPERT.match(suffix)
        if seq:
            local = f"{prefix}mlp.experts.local_experts.{slot}.{seq.group(2)}"
            return Location(pp_rank, chunk, (ep_rank,), local)
        stacked = _STACKED_EXPERT.match(suffix)
        return Location(pp_rank, chunk, (ep_rank,),
                        f"{prefix}mlp.experts.{stacked.group(1)}", slot)

    def globalize(self, local_name: str, desc: GPTDescription, pp_rank: int, chunk: int,
                  ep_rank: int) -> List[Tuple[str, Optional[int]]]:
        """Canonical names of a rank file's entry: ``[(name, stack slot or None)]`` (one per
        expert for a stacked-experts param). A tied output copy keeps its own name."""
        parts = _layer_parts(local_name)
        if parts is None:
            return [(local_name, None)]
        kind, index, suffix = parts
        if kind == "mtp":
            prefix = local_name[:len(local_name) - len(suffix)]
        else:
            prefix = f"decoder.layers.{index + self.layer_range(desc, pp_rank, chunk)[0]}."
        seq = _SEQ_EXPERT.match(suffix)
        n_local = (desc.num_moe_experts or self.ep) // self.ep
        if seq:
            index = ep_rank * n_local + int(seq.group(1))
            return [(f"{prefix}mlp.experts.local_experts.{index}.{seq.group(2)}", None)]
        if _STACKED_LOCAL.match(suffix):
            return [(f"{prefix}{suffix}/expert{ep_rank * n_local + slot}", slot)
                    for slot in range(n_local)]
        return [(prefix + suffix, None)]

    def degrees(self) -> Dict[str, object]:
        """``parallel_layout`` entry of a converted checkpoint (dp unknown: None, so RNG
        states are never restored from it)."""
        return {"tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp,
                "data_parallel_size": None, "context_parallel_size": 1,
                "expert_model_parallel_size": self.ep, "expert_tensor_parallel_size": self.tp,
                "virtual_pipeline_model_parallel_size": self.vpp,
                "world_size": self.tp * self.pp * self.ep}

    def config_fields(self) -> Dict[str, object]:
        """The TransformerConfig layout fields of this layout."""
        return {"tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp,
                "expert_model_parallel_size": self.ep, "expert_tensor_parallel_size": self.tp,
                "virtual_pipeline_model_parallel_size": self.vpp,
                "num_layers_in_first_pipeline_stage": self.first_stage_layers,
                "num_layers_in_last_pipeline_stage": self.last_stage_layers}


def _norm(prefix: str, desc: GPTDescription) -> List[str]:
    return [f"{prefix}.weight"] + ([f"{prefix}.bias"] if desc.normalization == "LayerNorm" else [])


def _linear(prefix: str, bias: bool) -> List[str]:
    return [f"{prefix}.weight"] + ([f"{prefix}.bias"] if bias else [])


def _moe_names(p: str, desc: GPTDescription) -> List[str]:
    bias = desc.add_bias_linear
    names = [f"{p}.mlp.router.weight"]
    if desc.moe_router_enable_expert_bias:
        names.append(f"{p}.mlp.router.expert_bias")
    for e in range(desc.num_moe_experts):
        if desc.moe_grouped_gemm:
            names += [f"{p}.mlp.experts.weight1/expert{e}", f"{p}.mlp.experts.weight2/expert{e}"]
            names += [f"{p}.mlp.experts.bias1/expert{e}",
                      f"{p}.mlp.experts.bias2/expert{e}"] if bias else []
        else:
            names += _linear(f"{p}.mlp.experts.local_experts.{e}.linear_fc1", bias)
            names += _linear(f"{p}.mlp.experts.local_experts.{e}.linear_fc2", bias)
    if desc.moe_shared_expert_intermediate_size:
        names += _linear(f"{p}.mlp.shared_experts.mlp.linear_fc1", bias)
        names += _linear(f"{p}.mlp.shared_experts.mlp.linear_fc2", bias)
        if desc.moe_shared_expert_gate:
            names.append(f"{p}.mlp.shared_experts.gate_weight")
    return names


def _mla_names(p: str, desc: GPTDescription) -> List[str]:
    if desc.q_lora_rank is None:
        names = [f"{p}.linear_q_proj.weight"]
    else:
        names = [f"{p}.linear_q_down_proj.weight", *_norm(f"{p}.q_layernorm", desc),
                 f"{p}.linear_q_up_proj.weight"]
    return names + [f"{p}.linear_kv_down_proj.weight", *_norm(f"{p}.kv_layernorm", desc),
                    f"{p}.linear_kv_up_proj.weight"]


def expected_model_names(desc: GPTDescription) -> List[str]:
    """Every canonical model tensor ``desc`` implies, in module order: what a converted
    checkpoint must contain, no more, no less."""
    names = [WORD_EMBEDDING]
    if desc.position_embedding_type == "learned_absolute":
        names.append("embedding.position_embeddings.weight")
    for layer in range(desc.num_layers):
        names += _layer_names(f"decoder.layers.{layer}", desc, desc.is_moe_layer(layer))
    names += _norm("decoder.final_layernorm", desc)
    if not desc.share_embeddings_and_output_weights:
        names.append(OUTPUT_LAYER)
    for depth in range(desc.mtp_num_layers or 0):
        p = f"mtp.layers.{depth}"
        names += _norm(f"{p}.enorm", desc) + _norm(f"{p}.hnorm", desc) + [f"{p}.eh_proj.weight"]
        # Each depth's layer is built from the last decoder layer's spec (GPTModel).
        names += _layer_names(f"{p}.transformer_layer", desc,
                              desc.is_moe_layer(desc.num_layers - 1))
        names += _norm(f"{p}.final_layernorm", desc)
    return names


def _layer_names(p: str, desc: GPTDescription, moe: bool) -> List[str]:
    """The canonical names of one transformer layer under prefix ``p``, in module order."""
    names = _norm(f"{p}.input_layernorm", desc)
    if desc.multi_latent_attention:
        names += _mla_names(f"{p}.self_attention", desc)
    else:
        names += _linear(f"{p}.self_attention.linear_qkv",
                         desc.add_bias_linear or desc.add_qkv_bias)
    names += _linear(f"{p}.self_attention.linear_proj", desc.add_bias_linear)
    if desc.qk_layernorm and not desc.multi_latent_attention:
        names += _norm(f"{p}.self_attention.q_layernorm", desc)
        names += _norm(f"{p}.self_attention.k_layernorm", desc)
    names += _norm(f"{p}.pre_mlp_layernorm", desc)
    if moe:
        names += _moe_names(p, desc)
    else:
        names += _linear(f"{p}.mlp.linear_fc1", desc.add_bias_linear)
        names += _linear(f"{p}.mlp.linear_fc2", desc.add_bias_linear)
    return names
