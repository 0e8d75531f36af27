"""Megatron-LM checkpoints as canonical tensors, and back: both of Megatron's layouts.

Legacy (``--ckpt-format torch``)::

    {save}/latest_checkpointed_iteration.txt      "1000" or "release"
    {save}/iter_0001000/ (or release/)
        mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt  (pp part when pp > 1, ep part when ep > 1)
            {"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration": int,
             "model" (or "model0", "model1", ... with virtual pipeline stages): state dict,
             "optimizer", "opt_param_scheduler", "rng_state", ...}

``torch_dist`` (megatron-core ``dist_checkpointing``): ``common.pt`` (``args``,
``checkpoint_version``, ``iteration``), ``metadata.json``, and a DCP checkpoint whose keys
are megatron-core's *sharded keys*: transformer layers stacked on a leading layer axis
(``decoder.layers.self_attention.linear_qkv.weight`` is ``[L, rows, h]``), routed experts
on a second one (``decoder.layers.mlp.experts.experts.linear_fc1.weight`` is
``[L, E, F1, h]``), norms under Transformer Engine's names, ``_extra_state`` objects as
``<key>/shard_<offset>_<shape>`` byte items.

Parameter names. megatron-core's local spec uses megacore's names (and the same fused
QKV row layout, per query group ``[q heads, k, v]``, and gated ``[gate; up]`` fc1), so
a Megatron tp=1 state dict *is* the canonical one. Transformer Engine's spec (Megatron-LM's
default) fuses the norms into the next linear layer::

    self_attention.linear_qkv.layer_norm_weight / _bias   <->  input_layernorm.weight / .bias
    mlp.linear_fc1.layer_norm_weight / _bias               <->  pre_mlp_layernorm.weight / .bias

Both are read. ``_extra_state`` entries (Transformer Engine's FP8 scaling metadata, None
for local layers) are not model weights: they are skipped on read (a non-empty one is
reported in the conversion notes) and written as None (what a local layer saves, and
what Transformer Engine accepts).

Vocabulary: Megatron pads the embedding to ``args.padded_vocab_size`` rows (a multiple of
``make_vocab_size_divisible_by * tp``); its logits cover them all, so all rows are kept
unless ``--true-vocab-size`` is given. The savers pad to that multiple again.

Optimizer state (``megatron_optimizer``): megatron-core's non-distributed optimizer
(``FP32Optimizer``, or ``Float16OptimizerWithFloat16Params`` with its fp32 main params and
grad scaler) is read as canonical ``optimizer/<field>/<name>`` tensors (``main_param``,
``exp_avg``, ``exp_avg_sq``, ``step``): legacy rank files matched by name through
megatron-core's group order, torch_dist ``optimizer.state.<field>.<key>`` entries by their
sharded key; the scheduler state is carried as is. The savers write it back in the same
forms (torch_dist: dense models). The distributed optimizer's state is not read (a
conversion note; loading it asks for ``--no-load-optim``). RNG states are per rank:
``megatron_load`` restores them when loading directly
(:meth:`MegatronDistSource.rng_state` for torch_dist); not converted.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from megacore.checkpointing.atomic import atomic_torch_save, atomic_write_bytes
from megacore.checkpointing.conversion.canonical import CanonicalSource, CommonState
from megacore.checkpointing.conversion.manifest import ConversionError, Manifest
from megacore.checkpointing.conversion.megacore_format import (
    LegacySource,
    _merge_optimizer_common,
    chunk_keys,
    rank_file_placements,
    write_rank_file,
)
from megacore.checkpointing.conversion.megatron_args import (
    MEGATRON_CHECKPOINT_VERSION,
    args_from_description,
    description_from_args,
    layout_from_args,
    load_megatron_file,
)
from megacore.checkpointing.conversion.megatron_dp_buckets import (
    DISTRIB_OPTIM_FILENAME,
    DP_BUCKET_FIELDS,
    assemble_dp_field,
    dp_bucket_keys,
    dp_group_object_key,
    is_distributed_optimizer_state,
    megacore_optimizer_from_distrib_optim,
)
from megacore.checkpointing.conversion.megatron_optimizer import (
    DP_RESHARDABLE,
    UnsupportedOptimizerState,
    dist_optimizer_common,
    dist_optimizer_entries,
    distributed_optimizer_common,
    megatron_dist_optimizer_common,
    megacore_optimizer_from_megatron,
    megatron_optimizer_from_megacore,
    megatron_params,
)
from megacore.checkpointing.conversion.model_description import GPTDescription
from megacore.checkpointing.conversion.streaming import Progress
from megacore.checkpointing.conversion.tensor_rules import (
    WORD_EMBEDDING,
    MegacoreLayout,
    layer_index,
    merge_from_tp,
    model_key,
    optimizer_key,
    parse_key,
    shard_rule,
    split_for_tp,
)
from megacore.checkpointing.paths import (
    COMMON_FILENAME,
    LEGACY_FILENAME,
    iteration_dir,
    legacy_file_path,
    resolve_checkpoint_dir,
    write_tracker,
)

__all__ = ["MegatronLegacySource", "MegatronDistSource", "MegatronLegacySaver",
           "MegatronDistSaver", "open_megatron_source", "is_megatron_checkpoint",
           "megatron_to_megacore_name", "megacore_to_megatron_name", "TRANSFORMER_IMPLS"]

TRANSFORMER_IMPLS = ("local", "transformer_engine")
"""Parameter naming of a written legacy checkpoint (Megatron's ``--transformer-impl``)."""

_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_LOCAL_TO_TE = {v: k for k, v in _TE_TO_LOCAL.items()}
_LAYER_PREFIX = re.compile(r"^(decoder\.layers\.\d+\.)(.+)$")
_EXTRA_STATE = "._extra_state"
# Submodules of a megatron-core TransformerLayer in registration (= named_parameters)
# order; SelfAttention creates linear_proj (in Attention.__init__) before linear_qkv.
_MEGATRON_LAYER_ORDER = ("input_layernorm.", "self_attention.linear_proj.",
                         "self_attention.linear_qkv.", "self_attention.q_layernorm.",
                         "self_attention.k_layernorm.", "pre_cross_attn_layernorm.",
                         "cross_attention.", "pre_mlp_layernorm.", "mlp.")
_DIST_EXPERTS = "mlp.experts.experts."
_RNG_SHARD = re.compile(r"^rng_state/shard_([\d.]+)_[\d.]+$")
_LOCAL_EXPERTS = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def megatron_to_megacore_name(name: str) -> str:
    """A Megatron (local or Transformer Engine) parameter name as megacore names it."""
    match = _LAYER_PREFIX.match(name)
    if match and match.group(2) in _TE_TO_LOCAL:
        return match.group(1) + _TE_TO_LOCAL[match.group(2)]
    return name


def megacore_to_megatron_name(name: str, transformer_impl: str, moe_layer: bool) -> str:
    """The Megatron name of a megacore parameter (``transformer_impl``: naming scheme;
    Transformer Engine keeps a separate pre-MLP norm in MoE layers)."""
    match = _LAYER_PREFIX.match(name)
    if transformer_impl == "local" or not match or match.group(2) not in _LOCAL_TO_TE:
        return name
    if moe_layer and match.group(2).startswith("pre_mlp_layernorm"):
        return name
    return match.group(1) + _LOCAL_TO_TE[match.group(2)]


def megatron_module_order(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``state_dict`` in megatron-core's module order: within each transformer layer the
    entries follow ``_MEGATRON_LAYER_ORDER`` (stable otherwise). Megatron's optimizer
    state is positional in this order (``megatron_optimizer``)."""
    def key(item):
        position, (name, _) = item
        match = _LAYER_PREFIX.match(name)
        if not match:
            return (position, 0)
        rank = next((i for i, p in enumerate(_MEGATRON_LAYER_ORDER)
                     if match.group(2).startswith(p)), len(_MEGATRON_LAYER_ORDER))
        first = layer_starts[match.group(1)]
        return (first, rank, position)

    layer_starts: Dict[str, int] = {}
    for position, name in enumerate(state_dict):
        match = _LAYER_PREFIX.match(name)
        if match:
            layer_starts.setdefault(match.group(1), position)
    ordered = sorted(enumerate(state_dict.items()), key=key)
    return {name: value for _, (name, value) in ordered}


def _is_empty_extra_state(value: Any) -> bool:
    if value is None:
        return True
    if torch.is_tensor(value):
        return value.numel() == 0
    return False


# -- detection ----------------------------------------------------------------------------
def _first_rank_file(iter_dir: str) -> Optional[str]:
    files = sorted(glob.glob(os.path.join(iter_dir, "mp_rank_*", LEGACY_FILENAME)))
    return files[0] if files else None


def is_megatron_checkpoint(load_dir: str) -> bool:
    """Whether ``load_dir`` (a save directory or an iteration directory) holds a
    Megatron-LM checkpoint (``args`` stored, no megacore version), either layout."""
    try:
        iter_dir, _ = resolve_checkpoint_dir(load_dir)
    except Exception:  # noqa: BLE001 - not a checkpoint of any kind
        return False
    first = _first_rank_file(iter_dir)
    path = first or os.path.join(iter_dir, COMMON_FILENAME)
    if not os.path.isfile(path):
        return False
    try:
        state = load_megatron_file(path, mmap=first is not None)
    except Exception:  # noqa: BLE001 - unreadable here: let the real loader report it
        return False
    return isinstance(state, dict) and "args" in state and "megacore_version" not in state


def open_megatron_source(load_dir: str, manifest: Optional[Manifest] = None,
                         true_vocab_size: Optional[int] = None, load_optimizer: bool = False,
                         optimizer_required: bool = False) -> CanonicalSource:
    """The latest Megatron checkpoint under ``load_dir`` (or an iteration directory).

    ``load_optimizer``: also read the optimizer state; one megacore cannot read becomes a
    note, or (``optimizer_required``) an error naming the file."""
    iter_dir, _ = resolve_checkpoint_dir(load_dir)
    if _first_rank_file(iter_dir):
        return MegatronLegacySource(iter_dir, manifest, true_vocab_size, load_optimizer,
                                    optimizer_required)
    return MegatronDistSource(iter_dir, manifest, true_vocab_size, load_optimizer,
                              optimizer_required)


def _common(state: Dict[str, Any]) -> CommonState:
    """Iteration, and the data position Megatron-LM keeps in ``args``."""
    args = state.get("args")
    return CommonState(
        iteration=int(state.get("iteration", 0) or 0),
        consumed_train_samples=int(getattr(args, "consumed_train_samples", 0) or 0),
        consumed_valid_samples=int(getattr(args, "consumed_valid_samples", 0) or 0))


def _rng_notes(state: Dict[str, Any]) -> List[str]:
    if state.get("rng_state") is None:
        return []
    return ["Megatron's RNG states (per rank of its layout) were not converted; loading "
            "the Megatron checkpoint directly restores them"]


# -- legacy source ------------------------------------------------------------------------
class MegatronLegacySource(LegacySource):
    """A Megatron-LM legacy iteration directory (``mp_rank_*`` files) as canonical
    tensors; layout and model from ``args``, local or Transformer Engine names."""

    def __init__(self, iter_dir: str, manifest: Optional[Manifest] = None,
                 true_vocab_size: Optional[int] = None, load_optimizer: bool = False,
                 optimizer_required: bool = False):
        CanonicalSource.__init__(self, manifest)
        self.iter_dir = iter_dir
        first_path = _first_rank_file(iter_dir)
        if first_path is None:
            raise ConversionError(f"{iter_dir}: no mp_rank_*/{LEGACY_FILENAME} files")
        first = load_megatron_file(first_path, mmap=True)
        if "args" not in first:
            raise ConversionError(f"{first_path}: no 'args' entry; not a Megatron-LM "
                                  "checkpoint")
        self.megatron_args = first["args"]
        chunks = sum(1 for k in first if re.fullmatch(r"model\d+", k)) or 1
        self.layout = layout_from_args(self.megatron_args, chunks, where=first_path)
        lay = self.layout
        self.states: Dict[Tuple[int, int, int], dict] = {}
        for t in range(lay.tp):
            for p in range(lay.pp):
                for e in range(lay.ep):
                    path = legacy_file_path(iter_dir, t, p, lay.pp, e, lay.ep)
                    self.states[(t, p, e)] = load_megatron_file(path, mmap=True)
        self.description = description_from_args(
            self.megatron_args, embedding_rows=self._embedding_rows(chunks),
            true_vocab_size=true_vocab_size, where=first_path)
        self.common = _common(first)
        self.refs: Dict[str, Dict[int, List[tuple]]] = {}
        self._dropped_extra: List[str] = []
        has_optimizer = any(s.get("optimizer") is not None for s in self.states.values())
        converted = has_optimizer and load_optimizer and self._convert_optimizer(
            chunks, optimizer_required)
        self._index(chunks, load_optimizer=converted)
        if has_optimizer and not load_optimizer:
            self.notes.append("Megatron's optimizer state was not read (this saver does not "
                              "carry optimizer state)")
        self.notes += _rng_notes(first)
        if self._dropped_extra:
            self.notes.append(f"{len(self._dropped_extra)} non-empty _extra_state entries "
                              f"(Transformer Engine FP8 metadata) were not converted, e.g. "
                              f"{self._dropped_extra[0]}")
        self.manifest.check_source()

    def _convert_optimizer(self, chunks: int, required: bool) -> bool:
        """Replace each rank file's Megatron optimizer state by megacore's form (so the
        base class indexes it) and fill ``common``; False (and a note) when it is of a
        kind megacore cannot read and not ``required``."""
        lay, converted = self.layout, {}
        for (t, p, e), state in self.states.items():
            path = legacy_file_path(self.iter_dir, t, p, lay.pp, e, lay.ep)
            if state.get("optimizer") is None:
                raise ConversionError(f"{path} holds no optimizer state while other rank "
                                      "files do; resume with --no-load-optim")
            models = [state[k] for k in chunk_keys(chunks)]
            try:
                if is_distributed_optimizer_state(state["optimizer"]):
                    converted[(t, p, e)] = megacore_optimizer_from_distrib_optim(
                        state["optimizer"], _distrib_optim(path), megatron_params(models),
                        megatron_to_megacore_name, path)
                    continue
                converted[(t, p, e)] = megacore_optimizer_from_megatron(
                    state["optimizer"], models, megatron_to_megacore_name, lay.ep > 1, path)
            except UnsupportedOptimizerState as exc:
                if required:
                    raise
                self.notes.append(f"Megatron's optimizer state was not converted: {exc}")
                return False
        opt_common: Dict[str, Dict[str, Any]] = {}
        for key, opt in converted.items():
            self.states[key] = dict(self.states[key], optimizer=opt)
            for member in opt.get("optimizers", [opt]):
                _merge_optimizer_common(opt_common, member)
        self.common.optimizer_common = opt_common
        first = self.states[min(self.states)]
        self.common.opt_param_scheduler = first.get("opt_param_scheduler")
        return True

    def _megacore_local(self, local: str, value: Any) -> Optional[str]:
        if local.endswith(_EXTRA_STATE):
            if not _is_empty_extra_state(value):
                self._dropped_extra.append(local)
            return None
        return megatron_to_megacore_name(local)


def _distrib_optim(rank_file: str) -> Any:
    """The distributed optimizer's ``distrib_optim.pt`` next to a legacy rank file."""
    path = os.path.join(os.path.dirname(rank_file), DISTRIB_OPTIM_FILENAME)
    if not os.path.exists(path):
        raise UnsupportedOptimizerState(f"{rank_file}: saved by Megatron's distributed "
                                        f"optimizer, but {path} is missing; resume with "
                                        "--no-load-optim")
    return load_megatron_file(path)


# -- torch_dist source --------------------------------------------------------------------
class MegatronDistSource(CanonicalSource):
    """A megatron-core ``torch_dist`` directory as canonical tensors.

    A stacked tensor (``[L, ...]``, ``[L, E, ...]``) is read whole the first time one of
    its layers is asked for and kept until :meth:`close`: memory up to one copy of the
    model.
    """

    def __init__(self, iter_dir: str, manifest: Optional[Manifest] = None,
                 true_vocab_size: Optional[int] = None, load_optimizer: bool = False,
                 optimizer_required: bool = False):
        super().__init__(manifest)
        self.iter_dir = iter_dir
        common_path = os.path.join(iter_dir, COMMON_FILENAME)
        common = load_megatron_file(common_path)
        self._optimizer = (common.get("optimizer") if load_optimizer else None,
                           optimizer_required)
        if "args" not in common:
            raise ConversionError(f"{common_path}: no 'args' entry; not a Megatron-LM "
                                  "checkpoint")
        self.megatron_args = common["args"]
        import torch.distributed.checkpoint as dcp

        self.meta = dcp.FileSystemReader(iter_dir).read_metadata().state_dict_metadata
        self.layout = layout_from_args(self.megatron_args, 1, where=common_path)
        emb = self.meta.get(WORD_EMBEDDING)
        self.description = description_from_args(
            self.megatron_args, embedding_rows=int(emb.size[0]) if emb is not None else None,
            true_vocab_size=true_vocab_size, where=common_path)
        desc = self.description
        if desc.is_moe and not all(desc.is_moe_layer(i) for i in range(desc.num_layers)):
            raise ConversionError(f"{iter_dir}: torch_dist checkpoints mixing dense and MoE "
                                  "layers are not supported")
        self.common = _common(common)
        self.refs: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
        self._cache: Dict[str, torch.Tensor] = {}
        self._steps: Dict[str, torch.Tensor] = {}
        # dp_reshardable: field -> {name: tensor}, assembled from the buckets on first read.
        self._dp_buckets: Optional[Tuple[Dict[int, List[str]], Dict[int, List[int]]]] = None
        self._dp_fields: Dict[str, Dict[str, torch.Tensor]] = {}
        self._index()
        if self._optimizer[0] is not None:
            self.common.opt_param_scheduler = common.get("opt_param_scheduler")
        self.manifest.check_source()

    def _index(self) -> None:
        optimizer_keys = []
        for key, meta in self.meta.items():
            if not hasattr(meta, "size"):
                continue  # byte items: _extra_state, rng_state, rerun state
            if key.startswith("optimizer."):
                optimizer_keys.append(key)
                continue
            self._add_refs(key, model_key)
        common = self._optimizer[0]
        # A distributed optimizer's state may be byte items only (dp_zero_gather_scatter).
        distributed = isinstance(common, dict) and "param_state_sharding_type" in common
        if (optimizer_keys or distributed) and common is not None:
            try:
                self._index_optimizer(optimizer_keys)
                return
            except UnsupportedOptimizerState as exc:
                if self._optimizer[1]:
                    raise
                self.notes.append(f"Megatron's optimizer state was not converted: {exc}")
                return
        if optimizer_keys:
            self.notes.append(f"Megatron's torch_dist optimizer state ({len(optimizer_keys)} "
                              "tensors) was not read (this saver does not carry optimizer "
                              "state)")

    def rng_state(self, pp_rank: int, tp_rank: int) -> Optional[List[Dict[str, Any]]]:
        """Megatron-LM's RNG state list of the (pp, tp) position: the ``rng_state``
        ShardedObject (``shard_<pp>.<tp>_<PP>.<TP>``; with ``<dp>`` as a third offset, one
        shard per dp rank), unpickled with ``weights_only``; None when not saved."""
        shards = {}
        for key in self.meta:
            match = _RNG_SHARD.match(key)
            offset = tuple(int(x) for x in match.group(1).split(".")) if match else ()
            if offset[:2] == (pp_rank, tp_rank):
                shards[offset] = key
        keys = [shards[o] for o in sorted(shards)]
        if not keys:
            return None
        # megatron-core saves a byte item as the list of its ShardedObjects' data
        # (strategies/torch.py: _mcore_to_torch_sharded_object): one object per key here.
        objects = self._objects(keys)
        return [entry for k in keys for entry in objects[k]]

    def _objects(self, keys: List[str]) -> Dict[str, Any]:
        """The first ShardedObject of each byte item ``keys``, unpickled with
        ``weights_only`` (Megatron's allow-listed globals)."""
        import torch.distributed.checkpoint as dcp

        from megacore.checkpointing.conversion.megatron_args import megatron_safe_globals
        from megacore.checkpointing.safe_dcp import SafeLoadPlanner

        request: Dict[str, Any] = {k: io.BytesIO() for k in keys}
        # Metadata as for the tensors (_stacked); the byte items with weights_only.
        with torch.serialization.safe_globals(megatron_safe_globals()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(request, checkpoint_id=self.iter_dir, planner=SafeLoadPlanner(),
                     no_dist=True)
        return {k: request[k][0] for k in keys}

    def _add_refs(self, key: str, canonical_key, dcp_key: Optional[str] = None) -> None:
        """Refs of the canonical tensors of one stacked checkpoint tensor ``key`` (a
        model key; ``dcp_key``: where it is stored, default ``key``)."""
        dcp_key = dcp_key or key
        for name, index in self._canonical(key, tuple(self.meta[dcp_key].size)):
            if shard_rule(name, self.description) is None:
                self.manifest.add_unknown(dcp_key)
                continue
            self.refs[canonical_key(name)] = (dcp_key, index)
            self._register(canonical_key(name))

    def _index_optimizer(self, keys: List[str]) -> None:
        """Megatron's optimizer state (``megatron_optimizer``: the non-distributed
        optimizer's, or the distributed optimizer's ``fully_reshardable`` form): moments
        and fp32 main params by sharded key; the weights are the main params of fp32
        runs without them; one common step for every param."""
        where, common = self.iter_dir, self._optimizer[0]
        if isinstance(common, dict) and \
                common.get("param_state_sharding_type") == DP_RESHARDABLE:
            self._index_dp_buckets(keys, os.path.join(where, COMMON_FILENAME))
            return
        step, member = dist_optimizer_common(common, os.path.join(where, COMMON_FILENAME))
        for field, key, dcp_key in dist_optimizer_entries(keys, where):
            self._add_refs(key, lambda name, f=field: optimizer_key(f, name), dcp_key)
        self._register_steps(step, member)

    def _index_dp_buckets(self, keys: List[str], where: str) -> None:
        """The distributed optimizer's ``dp_reshardable`` buckets
        (``megatron_dp_buckets``): dense models at pp 1 without virtual stages; the
        param groups and step from model-parallel rank 0's ``optimizer`` object."""
        lay, desc = self.layout, self.description
        if lay.pp > 1 or lay.num_chunks > 1 or desc.is_moe:
            raise UnsupportedOptimizerState(
                f"{where}: Megatron's distributed-optimizer state in sharding type "
                f"'{DP_RESHARDABLE}' is read for dense models without pipeline "
                f"parallelism only (this one: pp {lay.pp}, {lay.num_chunks} virtual "
                f"stages, MoE {desc.is_moe}); resume with --no-load-optim")
        prefixes = dp_bucket_keys(keys, lay.tp, where)
        sizes = {g: [int(self.meta[f"{p}.param"].size[0]) for p in ps]
                 for g, ps in prefixes.items()}
        entries = {entry: [k for k in self.meta if k.startswith(dp_group_object_key(entry)
                                                                 + "/")]
                   for entry in ("optimizer", "grad_scaler")}
        objects = self._objects([k for ks in entries.values() for k in ks[:1]])
        state = {entry: objects[ks[0]] for entry, ks in entries.items() if ks}
        step, member = distributed_optimizer_common(state, where)
        self._dp_buckets = (prefixes, sizes)
        for name in list(self._names):
            for field in DP_BUCKET_FIELDS:
                self._register(optimizer_key(field, name))
        self._register_steps(step, member)

    def _dp_field(self, field: str) -> Dict[str, torch.Tensor]:
        """Every param's ``field`` from the ``dp_reshardable`` buckets (cached); the
        main params are checked against the weights first (:meth:`_check_dp_layout`)."""
        if not self._dp_fields:
            self._dp_fields["main_param"] = self._assemble_dp_field("main_param")
            self._check_dp_layout(self._dp_fields["main_param"])
        if field not in self._dp_fields:
            self._dp_fields[field] = self._assemble_dp_field(field)
        return self._dp_fields[field]

    def _check_dp_layout(self, mains: Dict[str, torch.Tensor]) -> None:
        """Each weight is its fp32 main param rounded to the weight's dtype (megatron-core
        copies the main params into the model after every step): a param order or
        padding that differs from megatron-core's would not match."""
        for name, main in mains.items():
            weight = self._read([model_key(name)])[model_key(name)]
            if not torch.equal(main.to(weight.dtype), weight):
                raise ConversionError(
                    f"{self.iter_dir}: the distributed optimizer's main param of {name} "
                    "does not match the weight: its bucket layout is not megatron-core "
                    "0.16.1's as megacore derives it; resume with --no-load-optim")

    def _assemble_dp_field(self, field: str) -> Dict[str, torch.Tensor]:
        """One field from the buckets: each tp rank's params in megatron-core's order
        with their local shapes (the weights split as Megatron splits them), sliced from
        the buckets and merged over tp."""
        prefixes, sizes = self._dp_buckets
        desc, impl = self.description, getattr(self.megatron_args, "transformer_impl",
                                               "local")
        names = list(self.model_names())
        order = megatron_module_order({megacore_to_megatron_name(n, impl, False): n
                                       for n in names})
        rows = int(self.meta[WORD_EMBEDDING].size[0])
        padded = dataclasses.replace(desc, vocab_size=rows, config_dict=None)
        weights = {n: self._raw(model_key(n)) for n in names}
        shapes = [{n: tuple(split_for_tp(w, shard_rule(n, desc), padded,
                                         self.layout.tp)[t].shape)
                   for n, w in weights.items()} for t in range(self.layout.tp)]
        return assemble_dp_field(
            DP_BUCKET_FIELDS[field], list(order.items()), shapes, prefixes, sizes,
            self._stacked, lambda n, parts: merge_from_tp(parts, shard_rule(n, desc), desc, n),
            self.iter_dir)

    def _register_steps(self, step: torch.Tensor, member: dict) -> None:
        """One common step for every param; the weights are the main params of runs
        without fp32 main params in the checkpoint."""
        for name in list(self._names):
            if optimizer_key("main_param", name) not in self.refs and \
                    self._dp_buckets is None:
                self.refs[optimizer_key("main_param", name)] = self.refs[model_key(name)]
                self._register(optimizer_key("main_param", name))
            self._steps[optimizer_key("step", name)] = step
            self._register(optimizer_key("step", name))
        _merge_optimizer_common(self.common.optimizer_common, member)

    def _canonical(self, key: str, size: Tuple[int, ...]):
        """``[(canonical name, index into the stacked tensor)]`` of a sharded key."""
        if not key.startswith("decoder.layers."):
            return [(key, ())]
        suffix = key[len("decoder.layers."):]
        layers = range(size[0])
        if suffix.startswith(_DIST_EXPERTS):
            rest = suffix[len(_DIST_EXPERTS):]
            return [(f"decoder.layers.{l}.mlp.experts.local_experts.{e}.{rest}", (l, e))
                    for l in layers for e in range(size[1])]
        return [(megatron_to_megacore_name(f"decoder.layers.{l}.{suffix}"), (l,))
                for l in layers]

    def _stacked(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            import torch.distributed.checkpoint as dcp

            meta = self.meta[key]
            request = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(request, checkpoint_id=self.iter_dir, no_dist=True)
            self._cache[key] = request[key]
        return self._cache[key]

    def _read(self, keys: List[str]) -> Dict[str, torch.Tensor]:
        out = {}
        for key in keys:
            if key in self._steps:
                out[key] = self._steps[key].clone()
                continue
            field, name = parse_key(key)
            if field is not None and self._dp_buckets is not None:
                out[key] = self._dp_field(field)[name].clone()
                continue
            tensor = self._raw(key)
            rule = shard_rule(name, self.description)
            if rule.vocab:
                tensor = tensor[:self.description.vocab_size]
            out[key] = tensor.clone()
        return out

    def _raw(self, key: str) -> torch.Tensor:
        """The checkpoint tensor of a canonical key (vocabulary rows still padded)."""
        if key not in self.refs:
            raise ConversionError(f"{self.iter_dir}: no tensor {key}")
        dcp_key, index = self.refs[key]
        return self._stacked(dcp_key)[index] if index else self._stacked(dcp_key)

    def close(self) -> None:
        self._cache.clear()
        self._dp_fields.clear()


# -- savers -------------------------------------------------------------------------------
def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _MegatronSaver:
    """Shared parts of the Megatron savers: target args, vocabulary padding."""

    fmt = ""

    def __init__(self, save_dir: str, layout: MegacoreLayout, *, progress: bool = True,
                 transformer_impl: str = "local", save_optimizer: bool = True):
        if transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got "
                             f"{transformer_impl!r}")
        self.save_dir, self.layout, self.progress = save_dir, layout, progress
        self.transformer_impl = transformer_impl
        self.save_optimizer = save_optimizer
        self.notes: List[str] = []
        """What the target did not get (added to the conversion notes)."""

    def _prepare(self, source: CanonicalSource) -> Tuple[str, GPTDescription, Any]:
        desc = source.description
        self.description = desc
        try:
            self.layout.check(desc)
        except ValueError as exc:
            raise ConversionError(f"target layout: {exc}") from exc
        if desc.num_query_groups % self.layout.tp:
            raise ConversionError(f"Megatron needs num_query_groups ({desc.num_query_groups}) "
                                  f"divisible by tp ({self.layout.tp})")
        if desc.moe_grouped_gemm:
            raise ConversionError("the Megatron saver writes SequentialMLP experts; the model "
                                  "has grouped (stacked) experts")
        if desc.mtp_num_layers:
            raise ConversionError(f"the Megatron saver does not write multi-token-prediction "
                                  f"layers; the model has mtp_num_layers {desc.mtp_num_layers}")
        base = getattr(source, "megatron_args", None)
        gpt = (desc.config_dict or {}).get("gpt") or {}
        divisible = int(getattr(base, "make_vocab_size_divisible_by", None)
                        or gpt.get("make_vocab_size_divisible_by") or 128)
        self.padded_vocab = _round_up(desc.vocab_size, divisible * self.layout.tp)
        args = args_from_description(desc, self.layout, base=base,
                                     padded_vocab_size=self.padded_vocab,
                                     make_vocab_size_divisible_by=divisible)
        args.ckpt_format = self.fmt
        args.transformer_impl = self.transformer_impl
        args.iteration = source.common.iteration
        args.consumed_train_samples = source.common.consumed_train_samples
        args.consumed_valid_samples = source.common.consumed_valid_samples
        iter_dir = iteration_dir(self.save_dir, source.common.iteration)
        os.makedirs(iter_dir, exist_ok=True)
        return iter_dir, desc, args

    def _header(self, args, source: CanonicalSource) -> Dict[str, Any]:
        return {"args": args, "checkpoint_version": MEGATRON_CHECKPOINT_VERSION,
                "iteration": source.common.iteration,
                "num_floating_point_operations_so_far": 0}

    def _padded(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A vocabulary tensor padded with zero rows to Megatron's padded vocabulary."""
        rule = shard_rule(name, self.description)
        if rule is None or not rule.vocab or tensor.shape[0] == self.padded_vocab:
            return tensor
        padded = tensor.new_zeros((self.padded_vocab,) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        return padded


class MegatronLegacySaver(_MegatronSaver):
    """Writes Megatron-LM's legacy rank files (``mp_rank_*``) for ``layout``, one file at
    a time, with local or Transformer Engine names (``transformer_impl``); with the
    source's optimizer state, megatron-core's non-distributed optimizer state dict
    (``megatron_optimizer``: ``FP32Optimizer``'s, or ``Float16OptimizerWithFloat16Params``'s
    for half-precision weights) and the scheduler state."""

    fmt = "torch"

    def save(self, source: CanonicalSource) -> str:
        iter_dir, desc, args = self._prepare(source)
        lay = self.layout
        padded_desc = dataclasses.replace(desc, vocab_size=self.padded_vocab, config_dict=None)
        names = source.model_names()
        bar = Progress(lay.tp * lay.pp * lay.ep, "writing rank files", self.progress)
        for p in range(lay.pp):
            for e in range(lay.ep):
                placements = rank_file_placements(lay, names, desc, p, e)
                keys = [model_key(pl[1]) for pl in placements]
                keys += [k for pl in placements for k in self._optimizer_keys(source, pl[1])]
                tensors = source.read(list(dict.fromkeys(keys)))
                for t in range(lay.tp):
                    tag = os.path.basename(os.path.dirname(
                        legacy_file_path("", t, p, lay.pp, e, lay.ep)))
                    state = self._header(args, source)
                    chunks = self._rank_chunks(tensors, placements, padded_desc, t, p, tag,
                                               source.manifest)
                    for key, sd in zip(chunk_keys(lay.num_chunks), chunks):
                        state[key] = sd
                    if self._with_optimizer(source):
                        state["optimizer"] = self._optimizer(source, tensors, placements,
                                                             padded_desc, chunks, t)
                        state["opt_param_scheduler"] = source.common.opt_param_scheduler
                    write_rank_file(iter_dir, lay, t, p, e, state)
                    bar.update()
        bar.close()
        write_tracker(self.save_dir, source.common.iteration)
        return iter_dir

    def _with_optimizer(self, source: CanonicalSource) -> bool:
        return self.save_optimizer and source.has_optimizer

    def _optimizer_keys(self, source: CanonicalSource, name: str) -> List[str]:
        if not self._with_optimizer(source):
            return []
        return [optimizer_key(f, name) for f in source.optimizer_fields(name)]

    def _optimizer(self, source: CanonicalSource, tensors, placements, desc: GPTDescription,
                   chunks: List[Dict[str, Any]], t: int) -> Any:
        """megatron-core's optimizer state dict of one rank file: each param's fields
        padded and split like its weight, in Megatron's param order."""
        fields: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
        for chunk, name, local, _ in placements:
            layer = layer_index(local)
            moe = layer is not None and desc.is_moe_layer(layer_index(name))
            target = megacore_to_megatron_name(local, self.transformer_impl, moe)
            rule = shard_rule(name, desc)
            fields[(chunk, target)] = {
                f: v if v.dim() == 0 else split_for_tp(self._padded(name, v), rule, desc,
                                                       self.layout.tp)[t].clone()
                for f in source.optimizer_fields(name)
                for v in [tensors[optimizer_key(f, name)]]}
        params = megatron_params(chunks)
        half = any(w.dtype in (torch.float16, torch.bfloat16) for _, _, w in params)
        groups, scaler = {}, None
        for kind, saved in source.common.optimizer_common.items():
            scaler = scaler if scaler is not None else saved.get("grad_scaler")
            for group in saved["param_groups"].values():
                no_wd = float(group.get("wd_mult", 1.0)) == 0.0
                groups[(no_wd, bool(group.get("is_expert_parallel", kind == "expert")))] = group
        return megatron_optimizer_from_megacore(params, fields, groups, half, scaler,
                                                self.layout.ep > 1)

    def _rank_chunks(self, tensors, placements, desc: GPTDescription, t: int, p: int,
                     tag: str, manifest: Manifest) -> List[Dict[str, Any]]:
        chunks: List[Dict[str, Any]] = [dict() for _ in range(self.layout.num_chunks)]
        for chunk, name, local, _ in placements:
            rule = shard_rule(name, desc)
            full = self._padded(name, tensors[model_key(name)])
            layer = layer_index(local)
            moe = layer is not None and desc.is_moe_layer(layer_index(name))
            target = megacore_to_megatron_name(local, self.transformer_impl, moe)
            manifest.plan(f"{tag}/{chunk}/{target}")
            chunks[chunk][target] = split_for_tp(full, rule, desc, self.layout.tp)[t]
            manifest.write(f"{tag}/{chunk}/{target}")
        last = self.layout.num_chunks - 1
        chunks = [megatron_module_order(sd) for sd in chunks]
        for chunk, sd in enumerate(chunks):
            for module in self._extra_state_modules(sd, p == self.layout.pp - 1 and
                                                    chunk == last):
                sd[module + _EXTRA_STATE] = None
        return chunks

    def _extra_state_modules(self, sd: Dict[str, Any], has_output_layer: bool) -> List[str]:
        """Modules whose state dict holds ``_extra_state`` in megatron-core: every linear
        layer (and, with Transformer Engine, the core attention)."""
        modules = []
        for name in list(sd):
            module = name.rsplit(".", 1)[0]
            if re.search(r"\.(linear_qkv|linear_proj|linear_fc1|linear_fc2)$", module) \
                    and module not in modules and name.endswith(".weight"):
                modules.append(module)
                if self.transformer_impl == "transformer_engine" and \
                        module.endswith("self_attention.linear_qkv"):
                    modules.append(module.replace("linear_qkv", "core_attention"))
        if has_output_layer:
            modules.append("output_layer")
        return modules


class MegatronDistSaver(_MegatronSaver):
    """Writes a megatron-core ``torch_dist`` directory: layers stacked on a leading axis
    under megatron-core's sharded keys, ``_extra_state`` byte items, ``common.pt``,
    ``metadata.json``. The layout only sets the vocabulary padding and the args."""

    fmt = "torch_dist"

    def save(self, source: CanonicalSource) -> str:
        import torch.distributed.checkpoint as dcp

        iter_dir, desc, args = self._prepare(source)
        if desc.is_moe and not all(desc.is_moe_layer(i) for i in range(desc.num_layers)):
            raise ConversionError("the torch_dist Megatron saver needs every layer to be MoE "
                                  "or none")
        names = source.model_names()
        for name in names:
            source.manifest.plan(model_key(name))
        tensors = source.read([model_key(n) for n in names])
        for name in names:
            source.manifest.write(model_key(name))
        state = self._stack(desc, {parse_key(k)[1]: v for k, v in tensors.items()})
        state.update(self._extra_states(state, desc))
        header = self._header(args, source)
        if self.save_optimizer and source.has_optimizer and desc.is_moe:
            self.notes.append("no optimizer state written: the torch_dist Megatron saver "
                              "does not write megatron-core's chained dense and expert "
                              "optimizers (MoE); use --ckpt-format torch to carry it")
        elif self.save_optimizer and source.has_optimizer:
            optimizer_state, header["optimizer"] = self._optimizer(source, desc, names, state)
            state.update(optimizer_state)
            header["opt_param_scheduler"] = source.common.opt_param_scheduler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=iter_dir, no_dist=True, planner=_raw_bytes_planner())
        atomic_torch_save(header, os.path.join(iter_dir, COMMON_FILENAME))
        metadata = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                    "common_backend": "torch", "common_backend_version": 1}
        atomic_write_bytes(os.path.join(iter_dir, "metadata.json"),
                           json.dumps(metadata).encode())
        write_tracker(self.save_dir, source.common.iteration)
        return iter_dir

    def _optimizer(self, source: CanonicalSource, desc: GPTDescription, names: List[str],
                   model: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], dict]:
        """megatron-core's non-distributed optimizer ``sharded_state_dict`` for the model:
        ``optimizer.state.<field>.<sharded key>`` tensors stacked like the weights (fp32
        main params as ``fp32_param`` for half-precision weights), and the common part
        (step, param groups) for ``common.pt``."""
        half = any(torch.is_tensor(t) and t.dtype in (torch.float16, torch.bfloat16)
                   for t in model.values())
        fields = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
        if half:
            fields["main_param"] = "fp32_param"
        out = {}
        for field, megatron_field in fields.items():
            tensors = source.read([optimizer_key(field, n) for n in names])
            stacked = self._stack(desc, {parse_key(k)[1]: v for k, v in tensors.items()})
            out.update({f"optimizer.state.{megatron_field}.{k}": v for k, v in stacked.items()})
        if not half:  # fp32: the weights are the main params
            source.manifest.consume([optimizer_key("main_param", n) for n in names])
        steps = source.read([optimizer_key("step", n) for n in names])
        step = next(iter(steps.values()))
        if any(not torch.equal(v, step) for v in steps.values()):
            raise ConversionError("the params' optimizer steps differ; megatron-core's "
                                  "torch_dist optimizer state keeps one common step")
        return out, megatron_dist_optimizer_common(source.common.optimizer_common, step, half)

    def _sharded_key(self, suffix: str, moe: bool) -> str:
        """megatron-core's sharded key of a layer suffix (norms under TE names, as its
        local spec also maps them)."""
        if suffix in _LOCAL_TO_TE:
            return "decoder.layers." + _LOCAL_TO_TE[suffix]
        match = _LOCAL_EXPERTS.match(suffix)
        if match:
            return f"decoder.layers.{_DIST_EXPERTS}{match.group(2)}"
        del moe
        return f"decoder.layers.{suffix}"

    def _stack(self, desc: GPTDescription, full: Dict[str, torch.Tensor]
               ) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        stacks: Dict[str, Dict[Tuple[int, ...], torch.Tensor]] = {}
        for name, tensor in full.items():
            layer = layer_index(name)
            if layer is None:
                out[name] = self._padded(name, tensor)
                continue
            suffix = name.split(".", 3)[3]
            match = _LOCAL_EXPERTS.match(suffix)
            index = (layer, int(match.group(1))) if match else (layer,)
            stacks.setdefault(self._sharded_key(suffix, desc.is_moe_layer(layer)), {})[index] = \
                tensor
        for key, parts in stacks.items():
            out[key] = _stack_parts(parts, key)
        return out

    def _extra_states(self, state: Dict[str, torch.Tensor], desc: GPTDescription
                      ) -> Dict[str, io.BytesIO]:
        """``_extra_state`` byte items (``torch.save([None])``) megatron-core expects for
        each linear layer, one per layer (and expert)."""
        out = {}
        for key, tensor in state.items():
            module, _, leaf = key.rpartition(".")
            if leaf != "weight" or not re.search(
                    r"\.(linear_qkv|linear_proj|linear_fc1|linear_fc2)$", module):
                continue
            lead = tuple(tensor.shape[:2 if _DIST_EXPERTS in key else 1])
            for index in _indices(lead):
                unique = (f"{module}{_EXTRA_STATE}/shard_{'.'.join(map(str, index))}_"
                          f"{'.'.join(map(str, lead))}")
                buffer = io.BytesIO()
                torch.save([None], buffer)
                buffer.seek(0)
                out[unique] = buffer
        del desc
        return out


def _raw_bytes_planner():
    """DCP's save planner, storing byte items as given: megatron-core stores each
    ``_extra_state`` as the bytes of ``torch.save([obj])`` (DCP's default would pickle the
    ``BytesIO`` object itself)."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    class RawBytesPlanner(DefaultSavePlanner):
        def transform_object(self, write_item, object):  # noqa: A002 - DCP's signature
            return object

    return RawBytesPlanner()


def _indices(shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
    if len(shape) == 1:
        return [(i,) for i in range(shape[0])]
    return [(i, j) for i in range(shape[0]) for j in range(shape[1])]


def _stack_parts(parts: Dict[Tuple[int, ...], torch.Tensor], key: str) -> torch.Tensor:
    lead = tuple(max(ix[d] for ix in parts) + 1 for d in range(len(next(iter(parts)))))
    if len(parts) != int(torch.tensor(lead).prod()):
        raise ConversionError(f"{key}: not every layer/expert has it ({len(parts)} of "
                              f"{lead}); megatron-core stacks it over all of them")
    ordered = [parts[ix] for ix in _indices(lead)]
    return torch.stack(ordered).reshape(lead + tuple(ordered[0].shape)).contiguous()
