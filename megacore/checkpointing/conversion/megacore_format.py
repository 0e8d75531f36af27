"""Read and write megacore checkpoints as canonical tensors, offline, in one process.

Loaders (format detected, any tp/pp/vpp/ep):

* :class:`LegacySource`: ``mp_rank_*`` files, memory-mapped; a canonical tensor is merged
  from its tp shards on request. Copies the layout replicates (dense params in every ep
  rank's file, a tied output layer on the last stage, replicated k/v rows, replicated
  norms) must be bitwise equal, else the conversion stops.
* :class:`DistSource`: torch_dist; reads just the requested keys through DCP.

Savers (:class:`LegacySaver`, :class:`DistSaver`) write a complete checkpoint for a target
:class:`MegacoreLayout` with model weights, the optimizer state (per param, so training
continues), scheduler state, iteration and consumed samples, and the model configuration
(the source's, with the target layout and a ``conversion`` section). RNG states belong
to ranks of the source layout and are not carried: load with ``no_load_rng=True``
(``--no-load-rng``).

Memory: the legacy saver builds one target rank file at a time (plus one layer of
canonical tensors); the torch_dist saver spills each layer to a scratch file and maps it
back, so DCP's single save sees file-backed tensors.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from megacore.checkpointing.conversion.canonical import (
    CanonicalSource,
    CommonState,
    layer_batches,
)
from megacore.checkpointing.conversion.manifest import ConversionError, Manifest
from megacore.checkpointing.conversion.model_description import GPTDescription
from megacore.checkpointing.conversion.streaming import Progress, SpillStore
from megacore.checkpointing.conversion.tensor_rules import (
    OUTPUT_LAYER,
    WORD_EMBEDDING,
    MegacoreLayout,
    merge_from_tp,
    parse_key,
    shard_rule,
    split_for_tp,
)
from megacore.checkpointing.dist_checkpoint import (
    _group_signature,
    read_common,
    read_dcp_metadata,
    write_common,
    write_dcp_tensors,
)
from megacore.checkpointing.integrity import record_dcp_digests
from megacore.checkpointing.legacy import model_chunk_keys, read_legacy_file, write_legacy_file
from megacore.checkpointing.paths import (
    LEGACY_FILENAME,
    detect_format,
    iteration_dir,
    legacy_file_path,
    resolve_checkpoint_dir,
    write_tracker,
)
from megacore.checkpointing.safe_dcp import safe_dcp_load
from megacore.checkpointing.save_load import common_state
from megacore.checkpointing.sharded_state import block_key, model_key, optimizer_key
from megacore.vocab_padding import pad_vocab_size

__all__ = ["LegacySource", "DistSource", "LegacySaver", "DistSaver", "open_megacore_source",
           "rank_file_placements", "chunk_keys", "write_rank_file"]

_BLOCK = re.compile(r"^(.*)/block(\d+)$")
_STACKED_BASE = re.compile(r"^(.*\.mlp\.experts\.(?:weight1|weight2|bias1|bias2))/expert\d+$")


chunk_keys = model_chunk_keys
"""The rank files' model chunk entries (``legacy.model_chunk_keys``)."""


def _members(opt_state: Optional[dict]) -> List[dict]:
    if not opt_state:
        return []
    return list(opt_state["optimizers"]) if "optimizers" in opt_state else [opt_state]


def _member_kind(groups) -> str:
    groups = list(groups.values()) if isinstance(groups, dict) else list(groups)
    return "expert" if any(g.get("is_expert_parallel") for g in groups) else "dense"


def _merge_optimizer_common(target: Dict[str, Dict[str, Any]], member: dict) -> None:
    groups = member.get("param_groups") or []
    if isinstance(groups, list):
        groups = {_group_signature(g): g for g in groups}
    entry = target.setdefault(_member_kind(groups),
                              {"param_groups": {}, "grad_scaler": member.get("grad_scaler")})
    for sig, group in groups.items():
        entry["param_groups"].setdefault(sig, group)


# -- legacy source ------------------------------------------------------------------------
class LegacySource(CanonicalSource):
    """A legacy (``torch``) iteration directory as canonical tensors.

    Args:
        iter_dir: the iteration directory.
        manifest: bookkeeping (a new one by default).
        true_vocab_size: overrides the vocabulary size.
        load_optimizer: also expose the optimizer state.
        block_spec: the decoder block spec the model was built with (None: megacore's
            GPT spec), which says what tensors it has (``GPTDescription.block_spec``).
    """

    def __init__(self, iter_dir: str, manifest: Optional[Manifest] = None,
                 true_vocab_size: Optional[int] = None, load_optimizer: bool = True,
                 block_spec: Any = None):
        super().__init__(manifest)
        self.iter_dir = iter_dir
        paths = sorted(glob.glob(os.path.join(iter_dir, "mp_rank_*", LEGACY_FILENAME)))
        if not paths:
            raise ConversionError(f"{iter_dir}: no mp_rank_*/{LEGACY_FILENAME} files")
        first = read_legacy_file(paths[0], mmap=True)
        lay = first["parallel_layout"]
        tp, pp = lay["tensor_model_parallel_size"], lay["pipeline_model_parallel_size"]
        ep = lay["expert_model_parallel_size"]
        etp = lay.get("expert_tensor_parallel_size") or tp
        model_cfg = (first.get("config") or {}).get("model") or {}
        if etp != tp and (model_cfg.get("num_moe_experts") or 0):
            raise ConversionError(f"{iter_dir}: legacy checkpoints with expert tp ({etp}) != "
                                  f"tp ({tp}) are not supported")
        chunks = int(first.get("num_model_chunks") or 1)
        self.layout = MegacoreLayout(
            tp=tp, pp=pp, ep=ep, vpp=chunks if chunks > 1 else None,
            first_stage_layers=model_cfg.get("num_layers_in_first_pipeline_stage"),
            last_stage_layers=model_cfg.get("num_layers_in_last_pipeline_stage"))
        self.states: Dict[Tuple[int, int, int], dict] = {}
        for t in range(tp):
            for p in range(pp):
                for e in range(ep):
                    self.states[(t, p, e)] = read_legacy_file(
                        legacy_file_path(iter_dir, t, p, pp, e, ep), mmap=True)
        rows = self._embedding_rows(chunks)
        self.description = GPTDescription.from_config_dict(
            first.get("config"), embedding_rows=rows, tp_size=tp,
            true_vocab_size=true_vocab_size, block_spec=block_spec)
        self.common = self._common(first, load_optimizer)
        # canonical key -> tp rank -> [(file key, path in the file, stack slot)]
        self.refs: Dict[str, Dict[int, List[tuple]]] = {}
        self._index(chunks, load_optimizer)
        self.manifest.check_source()

    def _embedding_rows(self, chunks: int) -> Optional[int]:
        sd = self.states[(0, 0, 0)][chunk_keys(chunks)[0]]
        if WORD_EMBEDDING not in sd:
            return None
        return int(sd[WORD_EMBEDDING].shape[0]) * self.layout.tp

    def _common(self, first: dict, load_optimizer: bool) -> CommonState:
        opt_common: Dict[str, Dict[str, Any]] = {}
        if load_optimizer:
            for state in self.states.values():
                for member in _members(state.get("optimizer")):
                    _merge_optimizer_common(opt_common, member)
        return CommonState(iteration=int(first.get("iteration", 0)),
                           consumed_train_samples=int(first.get("consumed_train_samples", 0)),
                           consumed_valid_samples=int(first.get("consumed_valid_samples", 0)),
                           opt_param_scheduler=first.get("opt_param_scheduler")
                           if load_optimizer else None,
                           extra_state=first.get("extra_state"), optimizer_common=opt_common)

    def _canonical(self, local: str, p: int, c: int, e: int, scalar: bool):
        """``[(canonical name, slot)]`` of a local name. A tied output copy maps to the word
        embedding; the 0-dim state of a stacked-experts param keeps the stacked name."""
        pairs = self.layout.globalize(local, self.description, p, c, e)
        if scalar and pairs[0][1] is not None:
            return [(_stacked_base(pairs[0][0]), None)]
        tied = self.description.share_embeddings_and_output_weights
        return [(WORD_EMBEDDING if tied and name == OUTPUT_LAYER else name, slot)
                for name, slot in pairs]

    def _megacore_local(self, local: str, value: Any) -> Optional[str]:
        """The megacore name of a rank file's model entry (None: not a tensor to convert);
        subclasses reading other naming schemes override it."""
        del value
        return local

    def _add_ref(self, key: str, t: int, ref: tuple, where: str) -> None:
        field, name = parse_key(key)
        known = shard_rule(name, self.description) is not None or (
            field is not None and _STACKED_BASE.match(f"{name}/expert0") is not None)
        if not known:
            self.manifest.add_unknown(where)
            return
        if key not in self.refs:
            self.refs[key] = {}
            self._register(key)
        self.refs[key].setdefault(t, []).append(ref)

    def _index(self, chunks: int, load_optimizer: bool) -> None:
        for (t, p, e), state in self.states.items():
            fname = os.path.basename(os.path.dirname(
                legacy_file_path(self.iter_dir, t, p, self.layout.pp, e, self.layout.ep)))
            for c, ckey in enumerate(chunk_keys(chunks)):
                for local in state[ckey]:
                    megacore_local = self._megacore_local(local, state[ckey][local])
                    if megacore_local is None:
                        continue
                    for name, slot in self._canonical(megacore_local, p, c, e, False):
                        self._add_ref(model_key(name), t, ((t, p, e), (ckey, local), slot),
                                      f"{fname}/{ckey}/{local}")
            if not load_optimizer:
                continue
            for m, member in enumerate(_members(state.get("optimizer"))):
                for pname, fields in member["params"].items():
                    c, _, local = pname.partition("/")
                    for field, value in fields.items():
                        for name, slot in self._canonical(local, p, int(c), e, value.dim() == 0):
                            path = ("optimizer", m, "params", pname, field)
                            self._add_ref(optimizer_key(field, name), t,
                                          ((t, p, e), path, slot),
                                          f"{fname}/optimizer/{pname}/{field}")

    def _fetch(self, ref: tuple) -> torch.Tensor:
        file_key, path, slot = ref
        state = self.states[file_key]
        if path[0] == "optimizer":
            _, member, _, pname, field = path
            obj = _members(state["optimizer"])[member]["params"][pname][field]
        else:
            obj = state[path[0]][path[1]]
        return obj if slot is None else obj[slot]

    def _read(self, keys: List[str]) -> Dict[str, torch.Tensor]:
        out = {}
        for key in keys:
            _, name = parse_key(key)
            per_rank = self.refs.get(key)
            if per_rank is None:
                raise ConversionError(f"{self.iter_dir}: no tensor {key}")
            shards = []
            for t in range(self.layout.tp):
                refs = per_rank.get(t)
                if not refs:
                    raise ConversionError(f"{self.iter_dir}: {key} is missing from tp rank {t}")
                tensors = [self._fetch(r) for r in refs]
                for other in tensors[1:]:  # ep replicas, the tied copy
                    if not torch.equal(tensors[0], other):
                        raise ConversionError(f"{self.iter_dir}: the copies of {key} in the "
                                              "rank files differ; the checkpoint is inconsistent")
                shards.append(tensors[0])
            rule = shard_rule(name, self.description)
            if rule is None:  # 0-dim state of a stacked param
                out[key] = shards[0].clone()
                continue
            out[key] = merge_from_tp(shards, rule, self.description, key).clone()
        return out


# -- torch_dist source --------------------------------------------------------------------
class DistSource(CanonicalSource):
    """A torch_dist iteration directory as canonical tensors (args as :class:`LegacySource`)."""

    def __init__(self, iter_dir: str, manifest: Optional[Manifest] = None,
                 true_vocab_size: Optional[int] = None, load_optimizer: bool = True,
                 block_spec: Any = None):
        super().__init__(manifest)
        self.iter_dir = iter_dir
        common = read_common(iter_dir)
        self.meta = read_dcp_metadata(iter_dir).state_dict_metadata
        lay = common.get("parallel_layout") or {}
        tp = int(lay.get("tensor_model_parallel_size") or 1)
        self.layout = MegacoreLayout(tp=tp, pp=int(lay.get("pipeline_model_parallel_size") or 1),
                                     ep=int(lay.get("expert_model_parallel_size") or 1))
        emb = self.meta.get(model_key(WORD_EMBEDDING))
        self.description = GPTDescription.from_config_dict(
            common.get("config"), embedding_rows=int(emb.size[0]) if emb is not None else None,
            tp_size=tp, true_vocab_size=true_vocab_size, block_spec=block_spec)
        opt_common: Dict[str, Dict[str, Any]] = {}
        if load_optimizer:
            for member in common.get("optimizer") or []:
                _merge_optimizer_common(opt_common, member)
        self.common = CommonState(
            iteration=int(common.get("iteration", 0)),
            consumed_train_samples=int(common.get("consumed_train_samples", 0)),
            consumed_valid_samples=int(common.get("consumed_valid_samples", 0)),
            opt_param_scheduler=common.get("opt_param_scheduler") if load_optimizer else None,
            extra_state=common.get("extra_state"), optimizer_common=opt_common)
        self.blocks: Dict[str, List[str]] = {}
        self._index(load_optimizer)
        self.manifest.check_source()

    def _index(self, load_optimizer: bool) -> None:
        for dcp_key, meta in self.meta.items():
            if not hasattr(meta, "size"):
                continue
            if dcp_key.startswith("optimizer/") and not load_optimizer:
                continue
            match = _BLOCK.match(dcp_key)
            key = match.group(1) if match else dcp_key
            field, name = parse_key(key) if "/" in key else (None, None)
            known = name is not None and (shard_rule(name, self.description) is not None or (
                field is not None and _STACKED_BASE.match(f"{name}/expert0") is not None))
            if not known:
                self.manifest.add_unknown(dcp_key)
                continue
            if key not in self.blocks:
                self.blocks[key] = []
                self._register(key)
            self.blocks[key].append(dcp_key)
        for key, parts in self.blocks.items():
            parts.sort(key=lambda k: int(_BLOCK.match(k).group(2)) if _BLOCK.match(k) else 0)

    def _read(self, keys: List[str]) -> Dict[str, torch.Tensor]:
        request = {}
        for key in keys:
            for dcp_key in self.blocks[key]:
                meta = self.meta[dcp_key]
                request[dcp_key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        safe_dcp_load(request, self.iter_dir, no_dist=True, quiet_single_process=True)
        out = {}
        for key in keys:
            _, name = parse_key(key)
            parts = [request[k] for k in self.blocks[key]]
            rule = shard_rule(name, self.description)
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=rule.tp_dim)
            if rule is not None and rule.vocab and tensor.dim() > 0:
                tensor = tensor[:self.description.vocab_size].contiguous()
            out[key] = tensor
        return out


def open_megacore_source(load_dir: str, manifest: Optional[Manifest] = None,
                         true_vocab_size: Optional[int] = None,
                         load_optimizer: bool = True, block_spec: Any = None
                         ) -> CanonicalSource:
    """The latest checkpoint under ``load_dir`` (or an iteration directory), either format
    (``block_spec``: as for :class:`LegacySource`)."""
    iter_dir, _ = resolve_checkpoint_dir(load_dir)
    cls = LegacySource if detect_format(iter_dir) == "torch" else DistSource
    return cls(iter_dir, manifest, true_vocab_size=true_vocab_size,
               load_optimizer=load_optimizer, block_spec=block_spec)


# -- savers -------------------------------------------------------------------------------
def _common_dict(source: CanonicalSource, layout: MegacoreLayout, fmt: str) -> Dict[str, Any]:
    c = source.common
    return common_state(
        ckpt_format=fmt, iteration=c.iteration, parallel_layout=layout.degrees(),
        num_model_chunks=layout.num_chunks, consumed_train_samples=c.consumed_train_samples,
        consumed_valid_samples=c.consumed_valid_samples,
        config_dict=source.description.to_config_dict(layout.config_fields()),
        extra_state=c.extra_state, opt_param_scheduler=c.opt_param_scheduler)


class _Saver:
    """Shared set-up of the megacore savers."""

    fmt = ""

    def __init__(self, save_dir: str, layout: MegacoreLayout, *, progress: bool = True,
                 save_optimizer: bool = True):
        self.save_dir, self.layout = save_dir, layout
        self.progress, self.save_optimizer = progress, save_optimizer

    def _prepare(self, source: CanonicalSource) -> str:
        try:
            self.layout.check(source.description)
        except ValueError as exc:
            raise ConversionError(f"target layout: {exc}") from exc
        iter_dir = iteration_dir(self.save_dir, source.common.iteration)
        os.makedirs(iter_dir, exist_ok=True)
        return iter_dir

    def _opt_keys(self, source: CanonicalSource, name: str) -> List[str]:
        if not self.save_optimizer:
            return []
        return [optimizer_key(f, name) for f in source.optimizer_fields(name)]


class LegacySaver(_Saver):
    """Writes ``mp_rank_*`` files for ``layout``, one file at a time."""

    fmt = "torch"

    def save(self, source: CanonicalSource) -> str:
        iter_dir = self._prepare(source)
        lay = self.layout
        names = source.model_names()
        bar = Progress(lay.tp * lay.pp * lay.ep, "writing rank files", self.progress)
        for p in range(lay.pp):
            for e in range(lay.ep):
                for t in range(lay.tp):
                    write_rank_file(iter_dir, lay, t, p, e,
                                    self._rank_state(source, names, t, p, e), digest=True)
                    bar.update()
        bar.close()
        write_tracker(self.save_dir, source.common.iteration)
        return iter_dir

    def _placements(self, names: List[str], desc: GPTDescription, p: int, e: int):
        return rank_file_placements(self.layout, names, desc, p, e)

    def _rank_state(self, source: CanonicalSource, names: List[str], t: int, p: int,
                    e: int) -> Dict[str, Any]:
        desc, lay = source.description, self.layout
        tag = os.path.basename(os.path.dirname(legacy_file_path("", t, p, lay.pp, e, lay.ep)))
        placements = self._placements(names, desc, p, e)
        self._manifest = source.manifest
        for target in dict.fromkeys(f"{tag}/{pl[0]}/{pl[2]}" for pl in placements):
            source.manifest.plan(target)
        chunks = [dict() for _ in range(lay.num_chunks)]
        opt_params: Dict[str, Dict[str, Dict[str, Any]]] = {"dense": {}, "expert": {}}
        stacked: Dict[Tuple[int, str], Dict[str, Dict[int, torch.Tensor]]] = {}
        for batch in layer_batches([pl[1] for pl in placements]):
            wanted = set(batch)
            group = [pl for pl in placements if pl[1] in wanted]
            keys = []
            for _, name, _, _ in group:
                keys += [model_key(name)] + self._opt_keys(source, name)
            keys += self._stacked_scalar_keys(source, group)
            tensors = source.read(list(dict.fromkeys(keys)))
            for chunk, name, local, slot in group:
                rule = shard_rule(name, desc)
                kind = "expert" if rule.expert else "dense"
                values = {"model": tensors[model_key(name)]}
                for field in (source.optimizer_fields(name) if self.save_optimizer else []):
                    values[field] = tensors[optimizer_key(field, name)]
                shards = {f: (v if v.dim() == 0 else split_for_tp(v, rule, desc, lay.tp)[t])
                          for f, v in values.items()}
                if slot is None:
                    self._place(chunks[chunk], opt_params[kind], chunk, local, shards, tag)
                else:
                    entry = stacked.setdefault((chunk, local), {})
                    for f, v in shards.items():
                        entry.setdefault(f, {})[slot] = v
                    for f in self._stacked_scalar_fields(source, name):
                        entry.setdefault(f, {})[-1] = tensors[optimizer_key(f, _stacked_base(
                            name))]
        for (chunk, local), fields in stacked.items():
            merged = {f: (v[-1] if -1 in v else torch.stack([v[s] for s in sorted(v)]))
                      for f, v in fields.items()}
            self._place(chunks[chunk], opt_params["expert"], chunk, local, merged, tag)
        return self._assemble(source, chunks, opt_params, tag)

    def _stacked_scalar_fields(self, source, name) -> List[str]:
        base = _stacked_base(name)
        if base is None or not self.save_optimizer:
            return []
        return source.optimizer_fields(base)

    def _stacked_scalar_keys(self, source, group) -> List[str]:
        keys = []
        for _, name, _, slot in group:
            if slot is not None:
                keys += [optimizer_key(f, _stacked_base(name))
                         for f in self._stacked_scalar_fields(source, name)]
        return keys

    def _place(self, chunk_sd: dict, opt: Dict[str, Dict[str, Any]], chunk: int, local: str,
               shards: Dict[str, torch.Tensor], tag: str) -> None:
        chunk_sd[local] = shards.pop("model")
        self._manifest.write(f"{tag}/{chunk}/{local}")
        fields = {f: v for f, v in shards.items()}
        if fields:
            opt[f"{chunk}/{local}"] = fields

    def _assemble(self, source: CanonicalSource, chunks: List[dict],
                  opt_params: Dict[str, Dict[str, Any]], tag: str) -> Dict[str, Any]:
        state = _common_dict(source, self.layout, "torch")
        for key, sd in zip(chunk_keys(self.layout.num_chunks), chunks):
            state[key] = sd
        state["optimizer"] = None
        if self.save_optimizer and source.has_optimizer:
            members = []
            for kind in ("dense", "expert"):
                params = opt_params[kind]
                if kind == "expert" and not params:
                    continue
                members.append(self._member(source, kind, chunks, params, tag))
            state["optimizer"] = members[0] if len(members) == 1 else {"optimizers": members}
        state["rng_state"] = None
        return state

    def _member(self, source: CanonicalSource, kind: str, chunks: List[dict],
                params: Dict[str, Any], tag: str) -> Dict[str, Any]:
        """A megacore optimizer state dict: param groups in the order the optimizer
        factory creates them (first param of each (wd_mult, expert) kind, module order;
        no-weight-decay = biases and 1-D params)."""
        saved = source.common.optimizer_common.get(kind)
        if saved is None:
            raise ConversionError(f"{tag}: the source has no {kind} optimizer param groups")
        order: List[str] = []
        for c, sd in enumerate(chunks):
            for local, tensor in sd.items():
                if f"{c}/{local}" not in params:
                    continue
                wd = 0.0 if local.endswith(".bias") or tensor.dim() == 1 else 1.0
                sig = _find_group(saved["param_groups"], wd, kind == "expert", tag)
                if sig not in order:
                    order.append(sig)
        groups = [dict(saved["param_groups"][s]) for s in order]
        if not groups:  # a rank without params still has one (empty) group
            groups = [dict(next(iter(saved["param_groups"].values())))]
        return {"param_groups": groups, "params": params, "grad_scaler": saved["grad_scaler"]}


def write_rank_file(iter_dir: str, layout: MegacoreLayout, t: int, p: int, e: int,
                    state: Dict[str, Any], digest: bool = False) -> None:
    """Atomically write the rank file of (tp ``t``, pp ``p``, ep ``e``), with its digest
    sidecar for a megacore checkpoint (``digest``; Megatron-LM's layout has none)."""
    write_legacy_file(legacy_file_path(iter_dir, t, p, layout.pp, e, layout.ep), state, digest)


def rank_file_placements(layout: MegacoreLayout, names: List[str], desc: GPTDescription,
                         p: int, e: int) -> List[Tuple[int, str, str, Optional[int]]]:
    """``[(chunk, canonical name, local name, slot)]`` of the rank files at pipeline rank
    ``p``, ep rank ``e``, in module order. With pp > 1 the last stage also holds the word
    embedding: under its own name first when multi-token prediction runs there (its copy,
    which a tied output layer reads), else as ``output_layer.weight`` when tied."""
    out = []
    for name in names:
        loc = layout.locate(name, desc)
        if loc.pp_rank == p and e in loc.ep_ranks:
            out.append((loc.chunk, name, loc.local_name, loc.stack_slot))
    if layout.pp == 1 or p != layout.pp - 1 or WORD_EMBEDDING not in names:
        return out
    last = layout.num_chunks - 1
    if desc.mtp_num_layers:
        out.insert(0, (last, WORD_EMBEDDING, WORD_EMBEDDING, None))
    elif desc.share_embeddings_and_output_weights:
        out.append((last, WORD_EMBEDDING, OUTPUT_LAYER, None))
    return out


def _stacked_base(name: str) -> Optional[str]:
    match = _STACKED_BASE.match(name)
    return match.group(1) if match else None


def _find_group(groups: Dict[str, dict], wd_mult: float, expert: bool, tag: str) -> str:
    found = [sig for sig, g in groups.items()
             if float(g.get("wd_mult", 1.0)) == wd_mult
             and bool(g.get("is_expert_parallel", False)) == expert
             and float(g.get("lr_mult", 1.0)) == 1.0]
    if len(found) != 1:
        raise ConversionError(f"{tag}: cannot tell the optimizer param group of params with "
                              f"wd_mult={wd_mult}, expert={expert}: the source has "
                              f"{len(found)} matching groups ({sorted(groups)})")
    return found[0]


class DistSaver(_Saver):
    """Writes a torch_dist checkpoint (layout-independent; ``layout`` sets the vocabulary
    padding and the recorded degrees)."""

    fmt = "torch_dist"

    def save(self, source: CanonicalSource) -> str:
        iter_dir = self._prepare(source)
        desc = source.description
        names = source.model_names()
        batches = layer_batches(names)
        for name in names:
            source.manifest.plan(model_key(name))
        scratch = tempfile.mkdtemp(prefix=".convert_spill_", dir=self.save_dir)
        try:
            spill, state = SpillStore(scratch), {}
            bar = Progress(len(batches), "collecting tensors", self.progress)
            for batch in batches:
                keys = []
                for name in batch:
                    keys += [model_key(name)] + self._opt_keys(source, name)
                    base = _stacked_base(name)
                    if base is not None and self.save_optimizer:
                        keys += [optimizer_key(f, base) for f in source.optimizer_fields(base)]
                tensors = source.read(list(dict.fromkeys(keys)))
                for name in batch:
                    source.manifest.write(model_key(name))
                state.update(spill.put(self._dcp_entries(tensors, desc)))
                bar.update()
            bar.close()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                write_dcp_tensors(state, iter_dir, no_dist=True)
            record_dcp_digests(iter_dir, 0, coordinator=True)
            del state
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        common = _common_dict(source, self.layout, "torch_dist")
        if self.save_optimizer and source.has_optimizer:
            common["optimizer"] = [source.common.optimizer_common[k]
                                   for k in ("dense", "expert")
                                   if k in source.common.optimizer_common]
        os.makedirs(os.path.join(iter_dir, "rng"), exist_ok=True)
        write_common(iter_dir, common)
        write_tracker(self.save_dir, source.common.iteration)
        return iter_dir

    def _dcp_entries(self, tensors: Dict[str, torch.Tensor], desc: GPTDescription
                     ) -> Dict[str, torch.Tensor]:
        """Global keys as ``sharded_state`` writes them: vocab padded for the target tp,
        stride-s tensors as ``/block<j>``."""
        out = {}
        for key, tensor in tensors.items():
            _, name = parse_key(key)
            rule = shard_rule(name, desc)
            if rule is None or tensor.dim() == 0 or rule.tp_dim is None:
                out[key] = tensor
                continue
            if rule.vocab:
                rows = pad_vocab_size(desc.vocab_size, tensor_model_parallel_size=self.layout.tp)
                padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
                padded[:tensor.shape[0]] = tensor
                tensor = padded
            stride = rule.stride
            if stride == 1 or rule.qkv:
                out[key] = tensor
            else:
                for j, block in enumerate(tensor.chunk(stride, dim=rule.tp_dim)):
                    out[block_key(key, j)] = block.contiguous()
        return out
