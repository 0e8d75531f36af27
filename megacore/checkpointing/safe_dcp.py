"""Reading ``torch.distributed.checkpoint`` (DCP) files without running their code.

DCP stores its ``.metadata`` as a pickle and reads it with ``pickle.load``; byte items
go through ``torch.load(weights_only=False)``. A pickle may name any callable, so a
hostile ``.metadata`` runs code the moment it is read. Everything in megacore that
reads a ``torch_dist`` checkpoint goes through this module instead:

* :func:`read_dcp_metadata_file` unpickles ``.metadata`` with
  :class:`RestrictedMetadataUnpickler`, which resolves only the classes DCP itself
  writes (:data:`ALLOWED_GLOBALS`, checked against what torch 2.13 pickles) and raises
  :class:`UnsafeCheckpointError` naming the file and the class for anything else,
  before that class is looked up, let alone called.
* :class:`SafeFileSystemReader` is DCP's ``FileSystemReader`` with that metadata read,
  so DCP's own ``pickle.load`` never runs; :class:`SafeLoadPlanner` loads byte items
  with ``torch.load(weights_only=True)`` (torch's allow-list of tensors and plain
  containers). Tensor items are already read with ``weights_only=True`` by torch 2.13.
* :func:`safe_dcp_load` is ``dcp.load`` with both.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from typing import Any, Dict

import torch

from megacore.checkpointing.errors import CheckpointError

__all__ = ["UnsafeCheckpointError", "RestrictedMetadataUnpickler", "ALLOWED_GLOBALS",
           "read_dcp_metadata_file", "SafeFileSystemReader", "SafeLoadPlanner",
           "safe_dcp_load"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"

ALLOWED_GLOBALS = {
    _DCP_METADATA: {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                    "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                    "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},  # plus every torch.<dtype>, checked by type below
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}
"""``module -> class names`` a DCP ``.metadata`` pickle may reference (plus the
``torch.<dtype>`` objects). Measured: torch 2.13's ``.metadata`` references exactly
Metadata, TensorStorageMetadata, TensorProperties, ChunkStorageMetadata,
MetadataIndex, StorageMeta, _MEM_FORMAT_ENCODING, _StorageInfo, _get_layout,
torch.Size, torch dtypes and pathlib.PosixPath; the others are DCP classes or plain
containers older or other writers use."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file references a class outside the allow-list (or is not a
    pickle): it was refused before anything in it ran."""


class RestrictedMetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS`.

    Args:
        file: the open binary file.
        path: the file's path, named in errors.
    """

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refusing to unpickle {module}.{name}: not a class that "
            "torch.distributed.checkpoint writes into its metadata (the file is corrupt "
            "or was crafted to run code; nothing in it was executed)")


def read_dcp_metadata_file(path: str):
    """The DCP ``Metadata`` in ``path``, unpickled with the restricted unpickler.

    Raises:
        UnsafeCheckpointError: a class outside the allow-list, or not a DCP Metadata.
        CheckpointError: the file is missing, truncated or not a pickle.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = RestrictedMetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or garbage: a named error
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(exc).__name__}: "
                              f"{exc})") from exc
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP "
                                    "Metadata")
    return metadata


def _reader_base():
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader


def _planner_base():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    return DefaultLoadPlanner


class SafeFileSystemReader(_reader_base()):
    """DCP's ``FileSystemReader`` whose ``read_metadata`` uses the restricted unpickler
    (DCP's own ``pickle.load`` of ``.metadata`` never runs)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = os.fspath(self._get_metadata_path(kwargs.get("rank")))
        metadata = read_dcp_metadata_file(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(_planner_base()):
    """DCP's ``DefaultLoadPlanner`` that loads byte items with
    ``torch.load(weights_only=True)`` instead of ``weights_only=False``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - weights_only refusal or corruption
            raise UnsafeCheckpointError(f"byte item {fqn!r}: refused by torch.load("
                                        f"weights_only=True) ({exc})") from exc
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def safe_dcp_load(state_dict: Dict[str, Any], iter_dir: str, *, no_dist: bool,
                  process_group=None, quiet_single_process: bool = False) -> None:
    """``dcp.load`` of ``iter_dir`` into ``state_dict`` through the safe reader and
    planner (collective unless ``no_dist``)."""
    import torch.distributed.checkpoint as dcp

    kwargs = dict(storage_reader=SafeFileSystemReader(iter_dir), planner=SafeLoadPlanner(),
                  no_dist=no_dist)
    if process_group is not None:
        kwargs["process_group"] = process_group
    if not quiet_single_process:
        dcp.load(state_dict, **kwargs)
        return
    with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state_dict, **kwargs)

