"""Layout-independent keys and shards for every model and optimizer tensor.

The distributed ("torch_dist") format stores each tensor once, under a key that does not
depend on the parallel layout, as a *global* tensor; each rank writes its shard. A later
run with any tp/pp/vpp/dp reads the global tensors and cuts its own shards.

Keys (``/`` separates parts, module names keep their dots)::

    model/<global name>                      a model param or persistent buffer
    optimizer/<field>/<global name>          optimizer state: main_param, exp_avg, ...
    <key>/block<j>                           block j of a tp-split param with stride s > 1

Global names are the chunk's ``state_dict`` names with pipeline-local indices made global:

* a module with an integer ``layer_number`` (1-based, global) inside a ``ModuleList``
  (``decoder.layers.<i>``) becomes ``decoder.layers.<layer_number - 1>``: with 4 layers
  and pp=2 the second stage's ``decoder.layers.0`` is saved as ``decoder.layers.2``; vpp
  chunks merge the same way;
* ``...local_experts.<i>`` becomes ``...local_experts.<ep_rank * n_local + i>``, and a
  param stacking this rank's experts on dim 0 (grouped experts, ``[El, ...]``) is saved
  as one tensor per expert, ``<key>/expert<global index>``;
* a tied output weight (``shared_embedding=True`` away from pipeline stage 0, chunk 0)
  takes the name of the word embedding it mirrors and is not saved a second time; on load
  it is filled from that key.

Shards (read from the modules by ``tensor_split``, which the offline converter uses too):
a param with ``tensor_model_parallel=True`` is split along ``partition_dim`` over
its tp group (expert-tp for ``allreduce=False`` params). With stride 1 the global tensor is
the concatenation of the rank shards, saved as a ``DTensor`` with ``Shard(dim)``. With
stride s the global dim is cut in ``tp * s`` blocks and rank r holds blocks
``r, r + tp, ...`` (see ``tensor_parallel.layers._shard_master_weight``): block j of every
rank's shard forms global block j, ``[d/s]`` along the dim, saved under ``<key>/block<j>``.
Replicated tensors are saved whole (DCP keeps one copy of identical (key, offset) items).

Loading reads each global tensor whole (memory: one model copy per rank, fine for the
converters and CPU runs), fits the vocabulary rows (the padded vocab size may differ
between layouts: the overlap is copied, extra rows are zero), and slices this rank's shard.

FSDP2 (``megacore.distributed.fully_shard_model``): a param or optimizer state that is a
``DTensor`` sharded over dp is gathered over dp (``full_tensor()``, collective in the same
order on every dp rank) into the tensor a non-FSDP rank of the same tp/pp layout holds, so
FSDP2 checkpoints are ordinary ones and reshard to and from any layout; on load, this
rank's dp shard of the filled tensor is written back into the DTensor.

Layout transforms: the fused QKV weight with fewer key/value groups than tp ranks holds
replicated key/value rows (``transformer.qkv_layout``); it is gathered over tp and saved
in the logical layout, and expanded for the loading tp size.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from megacore import collectives, device
from megacore.checkpointing.errors import CheckpointError
from megacore.checkpointing.parallel_layout import RankLayout
from megacore.checkpointing.tensor_split import (
    QKVGroups,
    TensorSplit,
    stacked_expert_indices,
    tensor_splits,
)
from megacore.tensor_parallel.layers import _shard_master_weight

__all__ = ["TensorEntry", "unwrap_model_chunks", "model_tensor_entries",
           "optimizer_tensor_entries", "entries_to_dcp_state_dict", "read_needed_keys",
           "fill_entries_from_full", "source_keys", "model_key", "optimizer_key", "block_key"]

_LAYER_INDEX = re.compile(r"^\d+$")


def model_key(global_name: str) -> str:
    """The checkpoint key of a model tensor (also the converter's canonical key)."""
    return f"model/{global_name}"


def optimizer_key(field: str, global_name: str) -> str:
    """The checkpoint key of one optimizer state field of a param."""
    return f"optimizer/{field}/{global_name}"


def block_key(key: str, block: int) -> str:
    return f"{key}/block{block}"


@dataclasses.dataclass
class LayoutTransform:
    """Maps a tensor between its tp-dependent full layout and the logical layout."""

    to_logical: Callable[[torch.Tensor], torch.Tensor]
    from_logical: Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class TensorEntry:
    """One local tensor and where it sits in the checkpoint.

    Attributes:
        key: checkpoint key (see the module docstring).
        tensor: the local tensor (param data, buffer, or optimizer state), read on save
            and written in place on load.
        tp_dim: dim split over tp, or None when replicated over tp.
        stride: blocks per rank along ``tp_dim``.
        tp_size, tp_rank, tp_group: the group ``tp_dim`` is split over.
        owner: this rank saves it (False for a tied copy saved under another name).
        vocab: dim 0 is a padded vocabulary that may differ between layouts.
        transform: tp-layout <-> logical layout map, or None.
        expert_slot: for a stacked-experts param ``[El, ...]``: which local expert this
            entry is (``tensor`` is that slice); None otherwise.
        key_suffix: ``/expert<global index>`` for such slices.
        split: how the tensor under ``key`` is split (``tensor_split``), as its module
            says; for a stacked-experts slice, the slice's split.
    """

    key: str
    tensor: torch.Tensor
    tp_dim: Optional[int] = None
    stride: int = 1
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None
    owner: bool = True
    vocab: bool = False
    transform: Optional[LayoutTransform] = None
    expert_slot: Optional[int] = None
    key_suffix: str = ""
    dp_sharded: Optional[DTensor] = None
    split: TensorSplit = TensorSplit()

    def global_shape(self) -> Tuple[int, ...]:
        """Shape of the full tensor in this layout (before any transform)."""
        shape = list(self.tensor.shape)
        if self.tp_dim is not None:
            shape[self.tp_dim] *= self.tp_size
        return tuple(shape)

    def with_tensor(self, key: str, tensor: torch.Tensor) -> "TensorEntry":
        """The same sharding for another tensor of the param's shape (optimizer state);
        0-dim tensors (``step``) are replicated."""
        tensor, dp_sharded = _gathered_over_dp(tensor)
        if tensor.dim() == 0:
            return dataclasses.replace(self, key=key, tensor=tensor, tp_dim=None, stride=1,
                                       vocab=False, transform=None, expert_slot=None,
                                       key_suffix="", dp_sharded=dp_sharded)
        if self.expert_slot is not None:
            tensor = tensor[self.expert_slot]
        return dataclasses.replace(self, key=key + self.key_suffix, tensor=tensor,
                                   dp_sharded=dp_sharded)

    def write_back(self) -> None:
        """After a load into a dp-gathered copy: keep this rank's dp shard of it."""
        if self.dp_sharded is None:
            return
        shard = distribute_tensor(self.tensor, self.dp_sharded.device_mesh,
                                  self.dp_sharded.placements, src_data_rank=None)
        with torch.no_grad():
            self.dp_sharded.to_local().copy_(shard.to_local())


def like_param(tensor: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """``tensor`` (the whole param's shape) sharded over dp like ``entry``'s FSDP2 param,
    so new optimizer state matches its param; unchanged for other params and scalars."""
    if entry.dp_sharded is None or tensor.dim() == 0:
        return tensor
    return distribute_tensor(tensor, entry.dp_sharded.device_mesh, entry.dp_sharded.placements,
                             src_data_rank=None)


def _gathered_over_dp(tensor: torch.Tensor) -> Tuple[torch.Tensor, Optional[DTensor]]:
    """``(tensor as a non-FSDP rank holds it, the DTensor or None)``."""
    if not isinstance(tensor, DTensor):
        return tensor, None
    return tensor.full_tensor().detach(), tensor


# -- naming ------------------------------------------------------------------------------
def unwrap_model_chunks(model_chunks) -> List[torch.nn.Module]:
    """The modules inside DDP (or similar ``.module``) wrappers; a single module is
    accepted as a one-chunk list."""
    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    out = []
    for chunk in model_chunks:
        while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
            chunk = chunk.module
        out.append(chunk)
    return out


def _global_module_prefixes(module: torch.nn.Module, layout: RankLayout) -> Dict[str, str]:
    """Local module path -> its global index, for renamed modules (layers, experts).

    Only the last component is stored: a path can hold several renamed components (an
    expert inside a layer of a later pipeline stage), each replaced in turn."""
    renames: Dict[str, str] = {}
    for name, sub in module.named_modules():
        parent, _, last = name.rpartition(".")
        if not _LAYER_INDEX.match(last):
            continue
        number = getattr(sub, "layer_number", None)
        if isinstance(number, int) and not isinstance(number, bool):
            renames[name] = str(number - 1)
        elif parent.endswith("local_experts"):
            n_local = len(module.get_submodule(parent))
            index = layout.ep_rank * n_local + int(last)
            renames[name] = str(index)
    return renames


def _globalize(name: str, renames: Dict[str, str]) -> str:
    parts = name.split(".")
    out: List[str] = []
    for i in range(len(parts)):
        out.append(renames.get(".".join(parts[:i + 1]), parts[i]))
    return ".".join(out)


def _tied_embedding_name(chunks: Sequence[torch.nn.Module], names: List[Dict[str, str]],
                         layout: RankLayout) -> Optional[str]:
    """Global name of the word embedding that tied output weights mirror: the
    ``shared_embedding`` param of pipeline stage 0, chunk 0 (all-gathered over pp)."""
    mine = None
    if layout.pp_rank == 0 and chunks:
        for local, tensor in chunks[0].state_dict(keep_vars=True).items():
            if getattr(tensor, "shared_embedding", False):
                mine = names[0][local]
                break
    if layout.pp == 1 or layout.groups is None:
        return mine
    gathered: List[Optional[str]] = [None] * layout.pp
    dist.all_gather_object(gathered, mine, group=layout.groups.pp)
    return gathered[0]


# -- special layouts ---------------------------------------------------------------------
def _qkv_transform(groups: QKVGroups, tp_size: int) -> LayoutTransform:
    from megacore.transformer.qkv_layout import collapse_qkv_rows, expand_qkv_rows

    kw = groups.layout_kwargs(tp_size)
    return LayoutTransform(to_logical=lambda t: collapse_qkv_rows(t, **kw),
                           from_logical=lambda t: expand_qkv_rows(t, **kw).contiguous())


def _transform(split: TensorSplit, layout: RankLayout) -> Optional[LayoutTransform]:
    """The fused QKV's transform when its key/value rows are replicated (ng < tp)."""
    if split.qkv is None or split.qkv.num_query_groups >= layout.tp:
        return None
    return _qkv_transform(split.qkv, layout.tp)


def _split_experts(entry: TensorEntry, indices: List[int]) -> List[TensorEntry]:
    if entry.dp_sharded is not None:
        raise CheckpointError(f"{entry.key}: experts stacked in one param (grouped GEMM) "
                              "cannot be saved under FSDP2 (--use-torch-fsdp2)")
    tp_dim = None if entry.tp_dim is None else entry.tp_dim - 1
    return [dataclasses.replace(entry, key=f"{entry.key}/expert{index}",
                                tensor=entry.tensor[slot], tp_dim=tp_dim, expert_slot=slot,
                                key_suffix=f"/expert{index}",
                                split=entry.split.without_leading_dim())
            for slot, index in enumerate(indices)]


# -- entries -----------------------------------------------------------------------------
def _entry_for(key: str, param: torch.Tensor, split: TensorSplit,
               layout: RankLayout) -> TensorEntry:
    """Entry for a param or buffer split as ``split`` says (``tensor_split``)."""
    tensor, dp_sharded = _gathered_over_dp(param.detach() if not isinstance(param, DTensor)
                                           else param)
    entry = TensorEntry(key=key, tensor=tensor, dp_sharded=dp_sharded, vocab=split.vocab,
                        transform=_transform(split, layout), split=split)
    if split.tp_dim is None:
        return entry
    expert = split.expert
    return dataclasses.replace(
        entry, tp_dim=split.tp_dim, stride=split.stride,
        tp_size=layout.etp if expert else layout.tp,
        tp_rank=layout.etp_rank if expert else layout.tp_rank,
        tp_group=layout.tp_group_for(expert))


def model_tensor_entries(model_chunks, layout: RankLayout
                         ) -> Tuple[List[TensorEntry], Dict[Tuple[int, str], List[TensorEntry]]]:
    """Entries for every tensor in the chunks' state dicts (collective over pp for the
    tied-embedding name). Returns the list and a map ``(chunk, local name) -> entries``
    (several for stacked experts)."""
    chunks = unwrap_model_chunks(model_chunks)
    names = []
    for chunk in chunks:
        renames = _global_module_prefixes(chunk, layout)
        names.append({local: _globalize(local, renames) for local in chunk.state_dict()})
    tied = _tied_embedding_name(chunks, names, layout)
    entries, by_local = [], {}
    for index, chunk in enumerate(chunks):
        splits, stacked = tensor_splits(chunk), stacked_expert_indices(chunk)
        for local, tensor in chunk.state_dict(keep_vars=True).items():
            if not torch.is_tensor(tensor):
                raise CheckpointError(f"model chunk {index} state entry {local!r} is a "
                                      f"{type(tensor).__name__}, not a tensor: the "
                                      "torch_dist format stores tensors only")
            global_name, owner = names[index][local], True
            if getattr(tensor, "shared_embedding", False) and tied is not None \
                    and not (layout.pp_rank == 0 and index == 0):
                global_name, owner = tied, False
            entry = _entry_for(model_key(global_name), tensor, splits[local], layout)
            entry.owner = owner
            pieces = _split_experts(entry, stacked[local]) if local in stacked else [entry]
            entries += pieces
            by_local[(index, local)] = pieces
    return entries, by_local


def _optimizer_members(state: dict) -> List[dict]:
    if "optimizers" in state:
        return list(state["optimizers"])
    if "params" in state and isinstance(state["params"], dict):
        return [state]
    raise CheckpointError("the torch_dist format needs a megacore optimizer (state dict with "
                          "'params' keyed '<chunk>/<param name>'); got keys "
                          f"{sorted(state)[:5]}")


def optimizer_tensor_entries(opt_state: dict, by_local: Dict[Tuple[int, str],
                                                              List[TensorEntry]]
                             ) -> List[TensorEntry]:
    """Entries for each ``params`` tensor of a megacore optimizer state dict (every member
    of a chained one), sharded like their params."""
    entries = []
    for member in _optimizer_members(opt_state):
        for name, fields in member["params"].items():
            chunk, _, local = name.partition("/")
            pieces = by_local.get((int(chunk), local))
            if pieces is None:
                raise CheckpointError(f"optimizer state names param {name!r}, which is not in "
                                      "the model chunks' state dicts")
            for piece in pieces:
                global_name = piece.key[len("model/"):len(piece.key) - len(piece.key_suffix)]
                for field, value in fields.items():
                    entries.append(piece.with_tensor(optimizer_key(field, global_name), value))
    return entries


# -- save --------------------------------------------------------------------------------
def _mesh(group, cache: dict):
    from torch.distributed.device_mesh import DeviceMesh

    if id(group) not in cache:
        cache[id(group)] = DeviceMesh.from_group(group, device.device_type())
    return cache[id(group)]


def _gather_full(entry: TensorEntry) -> torch.Tensor:
    """All-gather a stride-1 tp-split tensor to its full tp layout (collective over tp)."""
    local = entry.tensor.movedim(entry.tp_dim, 0).contiguous()
    flat = torch.empty(entry.tp_size * local.numel(), dtype=local.dtype, device=local.device)
    collectives.all_gather_single(flat, local.view(-1), group=entry.tp_group)  # [tp * numel]
    full = flat.view(entry.tp_size * local.shape[0], *local.shape[1:])
    return full.movedim(0, entry.tp_dim)


def entries_to_dcp_state_dict(entries: Sequence[TensorEntry]) -> Dict[str, torch.Tensor]:
    """The DCP state dict for the owned entries: plain tensors and ``DTensor`` shards.

    Collective over each tp group that holds a transformed (gathered) tensor.
    """
    from torch.distributed.tensor import DTensor, Shard

    meshes: dict = {}
    out: Dict[str, torch.Tensor] = {}
    for entry in entries:
        tensor = entry.tensor.detach()
        if entry.transform is not None:
            full = _gather_full(entry) if entry.tp_dim is not None and entry.tp_size > 1 \
                else tensor
            if entry.owner:
                out[entry.key] = entry.transform.to_logical(full).contiguous()
            continue
        if not entry.owner:
            continue
        if entry.tp_dim is None:
            out[entry.key] = tensor
            continue
        blocks = [tensor] if entry.stride == 1 else list(tensor.chunk(entry.stride,
                                                                      entry.tp_dim))
        for j, block in enumerate(blocks):
            key = entry.key if entry.stride == 1 else block_key(entry.key, j)
            block = block.contiguous()
            if entry.tp_size == 1:
                out[key] = block
                continue
            shape = list(block.shape)
            shape[entry.tp_dim] *= entry.tp_size
            out[key] = DTensor.from_local(block, _mesh(entry.tp_group, meshes),
                                          [Shard(entry.tp_dim)], run_check=False,
                                          shape=torch.Size(shape),
                                          stride=torch.empty(shape, device="meta").stride())
    return out


# -- load --------------------------------------------------------------------------------
def source_keys(entry: TensorEntry) -> List[str]:
    """The checkpoint keys an entry is read from (one per block for stride > 1)."""
    if entry.tp_dim is not None and entry.stride > 1 and entry.transform is None:
        return [block_key(entry.key, j) for j in range(entry.stride)]
    return [entry.key]


def read_needed_keys(entries: Sequence[TensorEntry], saved: Dict[str, object]
                     ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Empty full tensors (saved shape and dtype) for every key the entries need, and the
    keys that are missing from the checkpoint metadata ``saved`` (key -> tensor metadata)."""
    request, missing = {}, []
    for entry in entries:
        for key in source_keys(entry):
            meta = saved.get(key)
            if meta is None or not hasattr(meta, "size"):
                missing.append(key)
            elif key not in request:
                request[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    return request, missing


def _fit_vocab(full: torch.Tensor, wanted: Tuple[int, ...], entry: TensorEntry) -> torch.Tensor:
    if tuple(full.shape) == wanted:
        return full
    if entry.vocab and full.dim() == len(wanted) and full.shape[1:] == wanted[1:]:
        fitted = torch.zeros(wanted, dtype=full.dtype)
        rows = min(full.shape[0], wanted[0])
        fitted[:rows] = full[:rows]
        return fitted
    raise CheckpointError(f"{entry.key}: checkpoint holds shape {tuple(full.shape)}, the model "
                          f"needs {wanted} (global, over tp={entry.tp_size})")


def fill_entries_from_full(entries: Sequence[TensorEntry], full: Dict[str, torch.Tensor],
                           path: str) -> None:
    """Copy this rank's shard of each loaded global tensor into its entry (in place)."""
    for entry in entries:
        keys = source_keys(entry)
        if any(k not in full for k in keys):
            continue  # missing and tolerated (strict=False)
        if len(keys) == 1:
            tensor = full[keys[0]]
        else:
            tensor = torch.cat([full[k] for k in keys], dim=entry.tp_dim)
        wanted = entry.global_shape()
        if entry.transform is not None:
            tensor = entry.transform.from_logical(tensor)
        tensor = _fit_vocab(tensor, wanted, entry)
        if entry.tp_dim is not None and entry.tp_size > 1:
            tensor = _shard_master_weight(tensor, entry.tp_dim, entry.stride, entry.tp_rank,
                                          entry.tp_size)
        if tuple(tensor.shape) != tuple(entry.tensor.shape):
            raise CheckpointError(f"{path}: {entry.key} has local shape {tuple(tensor.shape)} "
                                  f"after sharding, the model needs {tuple(entry.tensor.shape)}")
        with torch.no_grad():
            entry.tensor.copy_(tensor)
        entry.write_back()
