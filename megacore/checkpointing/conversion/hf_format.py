"""Hugging Face safetensors checkpoints as canonical tensors, and back, shard by shard.

:class:`HFSource` reads ``config.json`` and ``model.safetensors.index.json`` (or a single
``model.safetensors``), opening shards lazily; a canonical tensor is built from its
:class:`MappingGroup`'s HF tensors on request. :class:`HFSaver` pulls canonical tensors
one mapping group at a time and appends the HF tensors to the current shard, which is
written when it reaches ``max_shard_size`` bytes (then renamed
``model-0000k-of-0000N.safetensors`` and listed in the index). Peak memory: one shard plus
one layer.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch

from megacore.checkpointing.conversion.canonical import CanonicalSource, CommonState
from megacore.checkpointing.conversion.hf_mappings import (
    MappingGroup,
    choose_architecture,
    description_from_hf_config,
    hf_config_from_description,
    mapping_groups,
    refuse_extra_layers,
)
from megacore.checkpointing.conversion.manifest import ConversionError, Manifest
from megacore.checkpointing.conversion.streaming import Progress
from megacore.checkpointing.conversion.tensor_rules import model_key, parse_key
from megacore.checkpointing.conversion.tokenizer_files import (
    hf_tokenizer_files,
    tokenizer_config,
)

__all__ = ["HFSource", "HFSaver", "ShardWriter", "is_hf_checkpoint", "INDEX_FILENAME"]

INDEX_FILENAME = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def is_hf_checkpoint(path: str) -> bool:
    """A directory with ``config.json`` and safetensors weights."""
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, INDEX_FILENAME))
        or os.path.isfile(os.path.join(path, _SINGLE)))


class HFSource(CanonicalSource):
    """A Hugging Face checkpoint directory as canonical tensors (no optimizer state)."""

    def __init__(self, hf_dir: str, manifest: Optional[Manifest] = None):
        from safetensors import safe_open

        super().__init__(manifest)
        self.hf_dir = hf_dir
        with open(os.path.join(hf_dir, "config.json")) as f:
            self.hf_config = json.load(f)
        self.architecture = (self.hf_config.get("architectures") or ["?"])[0]
        self.description = description_from_hf_config(self.hf_config)
        self.common = CommonState()
        self._open = lambda path: safe_open(path, framework="pt")
        self._handles: Dict[str, object] = {}
        self.weight_map = self._weight_map()
        self._fix_vocab()
        self._drop_mtp_without_weights()
        # The tokenizer beside the weights travels with the conversion (tokenizer_files).
        self.tokenizer_files = hf_tokenizer_files(hf_dir)
        self.description.config_dict = tokenizer_config(hf_dir, self.description.vocab_size)
        self.groups = mapping_groups(self.description, self.architecture)
        self.by_canonical: Dict[str, MappingGroup] = {}
        self._index()
        self._cache: Dict[int, Dict[str, torch.Tensor]] = {}

    def _weight_map(self) -> Dict[str, str]:
        index = os.path.join(self.hf_dir, INDEX_FILENAME)
        if os.path.isfile(index):
            with open(index) as f:
                return dict(json.load(f)["weight_map"])
        with self._open(os.path.join(self.hf_dir, _SINGLE)) as f:
            return {k: _SINGLE for k in f.keys()}

    def _handle(self, filename: str):
        if filename not in self._handles:
            self._handles[filename] = self._open(os.path.join(self.hf_dir, filename)).__enter__()
        return self._handles[filename]

    def _get(self, name: str) -> torch.Tensor:
        return self._handle(self.weight_map[name]).get_tensor(name)

    def _fix_vocab(self) -> None:
        """Some checkpoints pad the embedding beyond ``vocab_size``: the rows are the truth."""
        for name in ("transformer.wte.weight", "model.embed_tokens.weight"):
            if name in self.weight_map:
                shape = self._handle(self.weight_map[name]).get_slice(name).get_shape()
                self.description.vocab_size = int(shape[0])

    def _drop_mtp_without_weights(self) -> None:
        """transformers' ``DeepseekV3Config`` says ``num_nextn_predict_layers`` 1 by default
        and ``save_pretrained`` writes no such layer: with no weight of the first one, the
        model converts without multi-token prediction (noted). Some but not all depths
        present is refused later (missing weights)."""
        d = self.description
        prefix = f"model.layers.{d.num_layers}."
        if not d.mtp_num_layers or any(n.startswith(prefix) for n in self.weight_map):
            return
        self.notes.append(f"config.json num_nextn_predict_layers {d.mtp_num_layers}: the "
                          "checkpoint holds no weights of those layers; converted without "
                          "multi-token prediction")
        d.mtp_num_layers = None

    def _index(self) -> None:
        refuse_extra_layers(self.weight_map, self.description, self.architecture, self.hf_dir)
        known = set()
        for group in self.groups:
            missing = [n for n in group.hf + group.copies if n not in self.weight_map]
            if missing:
                raise ConversionError(f"{self.hf_dir}: {self.architecture} needs {missing}, "
                                      "which the checkpoint lacks")
            known.update(group.hf)
            known.update(group.duplicates)
            known.update(group.copies)
            for name in group.canonical:
                self.by_canonical[name] = group
                self._register(model_key(name))
        for name in sorted(set(self.weight_map) - known):
            self.manifest.add_unknown(name)
        self.manifest.check_source()

    def _group_tensors(self, group: MappingGroup) -> Dict[str, torch.Tensor]:
        hf = {n: self._get(n) for n in group.hf}
        for dup in group.duplicates:
            if dup in self.weight_map and not torch.equal(self._get(dup), hf[group.hf[0]]):
                raise ConversionError(f"{self.hf_dir}: {dup} differs from {group.hf[0]} although "
                                      "the config ties them (tie_word_embeddings)")
        for copy in group.copies:
            if not torch.equal(self._get(copy), hf[group.hf[0]]):
                raise ConversionError(f"{self.hf_dir}: {copy} differs from {group.hf[0]}: "
                                      "megacore's multi-token prediction shares the model's "
                                      "embedding and output head, so they must be equal")
        return group.from_hf(hf)

    def _read(self, keys: List[str]) -> Dict[str, torch.Tensor]:
        out, fresh = {}, {}
        for key in keys:
            field, name = parse_key(key)
            if field is not None:
                raise ConversionError(f"{self.hf_dir}: Hugging Face checkpoints hold no "
                                      f"optimizer state ({key})")
            group = self.by_canonical[name]
            gid = id(group)
            if gid not in fresh:
                fresh[gid] = self._cache.get(gid) or self._group_tensors(group)
            out[key] = fresh[gid][name]
        self._cache = fresh  # keep the last batch: a saver may ask again for the same layer
        return out

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


class ShardWriter:
    """Appends tensors to safetensors shards of at most ``max_shard_size`` bytes (a single
    larger tensor gets a shard of its own)."""

    def __init__(self, directory: str, max_shard_size: int, manifest: Optional[Manifest] = None):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.max_shard_size = directory, max_shard_size
        self.manifest = manifest
        self._buffer: Dict[str, torch.Tensor] = {}
        self._size = 0
        self._shards: List[List[str]] = []
        self.total_size = 0
        self.largest_shard_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._size + nbytes > self.max_shard_size:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._size += nbytes
        self.total_size += nbytes
        if self.manifest is not None:
            self.manifest.write(name)

    def _tmp_name(self, k: int) -> str:
        return os.path.join(self.directory, f".shard-{k:05d}.safetensors.tmp")

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        save_file(self._buffer, self._tmp_name(len(self._shards)), metadata={"format": "pt"})
        self.largest_shard_bytes = max(self.largest_shard_bytes, self._size)
        self._shards.append(list(self._buffer))
        self._buffer, self._size = {}, 0

    def finish(self) -> Dict[str, str]:
        """Write the last shard, give shards their final names, write the index; returns
        the weight map."""
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for k, names in enumerate(self._shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp_name(k), os.path.join(self.directory, final))
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        with open(os.path.join(self.directory, INDEX_FILENAME), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        return weight_map


class HFSaver:
    """Writes a Hugging Face checkpoint: safetensors shards, index and ``config.json``.

    Args:
        save_dir: output directory.
        architecture: HF class name (default: :func:`choose_architecture`).
        max_shard_size: bytes per shard.
        progress: show a progress bar.
    """

    def __init__(self, save_dir: str, architecture: Optional[str] = None,
                 max_shard_size: int = 2 * 1024 ** 3, progress: bool = True):
        self.save_dir, self.architecture = save_dir, architecture
        self.max_shard_size, self.progress = max_shard_size, progress
        self.largest_shard_bytes = 0

    def save(self, source: CanonicalSource) -> str:
        desc = source.description
        arch = self.architecture or choose_architecture(desc)
        groups = mapping_groups(desc, arch)
        config = hf_config_from_description(desc, arch)
        for group in groups:
            for name in group.hf + group.copies:
                source.manifest.plan(name)
        writer = ShardWriter(self.save_dir, self.max_shard_size, source.manifest)
        bar = Progress(len(groups), "writing Hugging Face shards", self.progress)
        for group in groups:
            canonical = source.read([model_key(n) for n in group.canonical])
            tensors = group.to_hf({parse_key(k)[1]: v for k, v in canonical.items()})
            for name in group.hf:
                writer.add(name, tensors[name])
            for name in group.copies:  # DeepSeek's MTP embedding/head: the same tensor again
                writer.add(name, tensors[group.hf[0]].clone())
            bar.update()
        bar.close()
        writer.finish()
        self.largest_shard_bytes = writer.largest_shard_bytes
        with open(os.path.join(self.save_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        return self.save_dir
