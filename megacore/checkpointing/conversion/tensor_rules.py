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
param (0-dim ``step`` replicated). Keys are ``sharded_state``'s (:func:`model_key`,
:func:`optimizer_key`): one spelling online and offline.

Which tensors a model has, in which order, and how each is split are not listed here:
they are read from the model itself, built on the meta device for the description
(``GPTDescription.model_tensors``, ``reference_model``), through ``tensor_split``, the
function the online format uses. :class:`ShardRule` is that split as the converter
applies it for tp ``t``: ``tp_dim``, ``stride`` (``t * stride`` blocks, rank ``r`` keeps
``r, r + t, ...``, as ``tensor_parallel.layers`` does), replicated k/v rows when
``ng < t``, vocabulary padding to a multiple of ``t``. :class:`MegacoreLayout` says which
rank file holds it and under which local name (pipeline stage by layer, ep rank by
expert).

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
from megacore.checkpointing.sharded_state import model_key, optimizer_key
from megacore.checkpointing.tensor_split import QKVGroups
from megacore.parallel_layout import ParallelLayout
from megacore.pipeline_parallel.layer_split import get_layer_offset_and_count
from megacore.tensor_parallel.layers import _shard_master_weight
from megacore.transformer.qkv_layout import collapse_qkv_rows, expand_qkv_rows
from megacore.vocab_padding import pad_vocab_size

__all__ = ["ShardRule", "shard_rule", "canonical_sort_key", "layer_group", "MegacoreLayout",
           "Location", "split_for_tp", "merge_from_tp", "WORD_EMBEDDING", "OUTPUT_LAYER",
           "model_key", "optimizer_key", "parse_key", "expected_model_names", "layer_index",
           "expert_index"]

WORD_EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SEQ_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_STACKED_EXPERT = re.compile(r"^mlp\.experts\.(weight1|weight2|bias1|bias2)/expert(\d+)$")
_STACKED_LOCAL = re.compile(r"^mlp\.experts\.(weight1|weight2|bias1|bias2)$")  # layer suffix
_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
_MTP_LAYER = "transformer_layer."
_MODEL_PREFIX = model_key("")


def parse_key(key: str) -> Tuple[Optional[str], str]:
    """``(optimizer field or None, canonical name)`` of a canonical key."""
    if key.startswith(_MODEL_PREFIX):
        return None, key[len(_MODEL_PREFIX):]
    _, field, name = key.split("/", 2)
    return field, name


@dataclasses.dataclass(frozen=True)
class ShardRule:
    """How the converter splits a canonical tensor over tp (see the module docstring):
    the model's ``tensor_split.TensorSplit`` plus its place in module order.

    Attributes:
        tp_dim: split dim, None when replicated over tp.
        stride: blocks per rank along ``tp_dim`` (2 for a gated fc1 ``[gate; up]``).
        qkv: head geometry of the fused QKV (k/v rows replicated when ``ng < tp``).
        vocab: dim 0 is the vocabulary (padded to a multiple of tp).
        expert: a routed expert's tensor (split over expert-tp, placed by ep).
        order: position in the model's module order.
    """

    tp_dim: Optional[int] = None
    stride: int = 1
    qkv: Optional[QKVGroups] = None
    vocab: bool = False
    expert: bool = False
    order: int = 0


def shard_rule(name: str, desc: GPTDescription) -> Optional[ShardRule]:
    """The rule of canonical model tensor ``name`` in the model ``desc`` describes, or
    None for a name that model does not have (the manifest reports those)."""
    tensors = desc.model_tensors()
    split = tensors.splits.get(name)
    if split is None:
        return None
    return ShardRule(tp_dim=split.tp_dim, stride=split.stride, qkv=split.qkv,
                     vocab=split.vocab, expert=split.expert, order=tensors.order[name])


def expected_model_names(desc: GPTDescription) -> List[str]:
    """Every canonical model tensor ``desc`` implies, in module order: what a converted
    checkpoint must contain, no more, no less (read from the model itself)."""
    return list(desc.model_tensors().names)


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


def layer_group(name: str) -> Tuple[int, int]:
    """``(section, index)``: embedding (0), a decoder layer (1, its index), final norm
    and output layer (2, 0), a multi-token prediction depth (3, its depth)."""
    mtp = _MTP.match(name)
    if mtp:
        return (3, int(mtp.group(1)))
    layer = layer_index(name)
    if layer is None:
        return (0 if name.startswith("embedding.") else 2, 0)
    return (1, layer)


def canonical_sort_key(name: str, desc: GPTDescription) -> Tuple:
    """Module order of the model ``desc`` describes (names it lacks last in their
    section)."""
    order = desc.model_tensors().order
    return layer_group(name) + (order.get(name, len(order)), name)


# -- tp split and merge -------------------------------------------------------------------
def _qkv_kw(rule: ShardRule, tp: int) -> dict:
    return rule.qkv.layout_kwargs(tp)


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
        full = expand_qkv_rows(full, **_qkv_kw(rule, tp))
    return [_shard_master_weight(full, rule.tp_dim, rule.stride, r, tp).contiguous()
            for r in range(tp)]


def merge_from_tp(shards: List[torch.Tensor], rule: ShardRule, desc: GPTDescription,
                  name: str) -> torch.Tensor:
    """Inverse of :func:`split_for_tp`. Replicas (replicated tensors, k/v rows) must be
    bitwise equal: a difference means the checkpoint is not what its config says."""
    tp = len(shards)
    if shards[0].dim() == 0 or rule.tp_dim is None:
        _check_replicas(shards, name)
        return shards[0]
    stride = rule.stride
    if stride == 1:
        full = torch.cat(shards, dim=rule.tp_dim)
    else:  # rank r holds blocks r, r + tp, ...: block j of every rank forms 1/stride
        parts = [s.chunk(stride, dim=rule.tp_dim) for s in shards]
        full = torch.cat([parts[r][j] for j in range(stride) for r in range(tp)],
                         dim=rule.tp_dim)
    if rule.qkv and rule.qkv.num_query_groups < tp:
        collapsed = collapse_qkv_rows(full, **_qkv_kw(rule, tp))
        _check_replicas([full, expand_qkv_rows(collapsed, **_qkv_kw(rule, tp))], name)
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
    """Where tensors sit in megacore rank files: a view of a :class:`ParallelLayout`.

    The degrees are those of :attr:`parallel`, the smallest world that holds one file per
    (tp, pp, ep) position: ``tp * pp * ep`` ranks with dp = ep (experts carved out of the
    data-parallel ranks), cp 1 and expert tp = tp (the legacy format needs it). This class
    adds what only rank files need: the uneven pipeline split and the name of each tensor
    in each file.

    Attributes:
        tp, pp, ep: degrees (the legacy format needs expert-tp == tp).
        vpp: model chunks per pipeline rank (None: 1).
        first_stage_layers, last_stage_layers: uneven pipeline split (None: even).
        parallel: the :class:`ParallelLayout` of these degrees (derived, validated).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    vpp: Optional[int] = None
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    parallel: ParallelLayout = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        try:
            parallel = ParallelLayout.from_degrees(tp=self.tp, pp=self.pp, dp=self.ep,
                                                   ep=self.ep, etp=self.tp, vpp=self.vpp)
        except ValueError as e:
            raise ValueError(f"rank-file layout tp={self.tp}, pp={self.pp}, ep={self.ep}, "
                             f"vpp={self.vpp}: {e}") from e
        object.__setattr__(self, "parallel", parallel)

    @property
    def num_chunks(self) -> int:
        return self.parallel.num_model_chunks

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
        return {**self.parallel.degrees(), "data_parallel_size": None}

    def config_fields(self) -> Dict[str, object]:
        """The TransformerConfig layout fields of this layout."""
        p = self.parallel
        return {"tensor_model_parallel_size": p.tensor_model_parallel_size,
                "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
                "expert_model_parallel_size": p.expert_model_parallel_size,
                "expert_tensor_parallel_size": p.expert_tensor_parallel_size,
                "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
                "num_layers_in_first_pipeline_stage": self.first_stage_layers,
                "num_layers_in_last_pipeline_stage": self.last_stage_layers}
