"""On-disk caches of dataset indices, and the rank-0-builds-first protocol around them.

Building the document/sample/shuffle indices of a large corpus takes seconds to minutes,
so they are saved as ``.npy`` files named after an md5 hash of everything that
determines them (the dataset's *description*, a JSON string)::

    {path_to_cache}/{hash}-GPTDataset-train-description.txt
    {path_to_cache}/{hash}-GPTDataset-train-document_index.npy
    ...

Any change of data, split, seed, sequence length or tokenizer changes the hash, so a
stale cache is never reused. Each file is written under a temporary name and renamed,
and the description is written last: a cache is complete exactly when its description
exists, so a crashed writer never leaves a cache that loads.

In a distributed job, rank 0 builds and saves while the other ranks wait at a barrier,
then load what rank 0 wrote (:func:`build_on_rank_zero_first`). This module is the only
part of ``megacore.datasets`` that touches ``torch.distributed``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, Iterable, Optional, TypeVar

import numpy as np

__all__ = ["IndexCache", "build_on_rank_zero_first", "distributed_rank"]

T = TypeVar("T")


def distributed_rank() -> Optional[int]:
    """This process's rank, or ``None`` outside an initialized ``torch.distributed`` job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


def build_on_rank_zero_first(build: Callable[[], T], synchronize: bool = True) -> T:
    """Run ``build`` on rank 0, then (after a barrier) on the other ranks.

    With caches on a shared filesystem, rank 0 writes them and the other ranks only
    load. Without ``torch.distributed`` it just calls ``build``.
    """
    import torch.distributed as dist

    rank = distributed_rank()
    if rank is None:
        return build()
    result = build() if rank == 0 else None
    if synchronize:
        dist.barrier()
    if rank != 0:
        result = build()
    return result


class IndexCache:
    """The cache files of one dataset split.

    Args:
        directory: the cache directory (created on save).
        description: JSON text that determines the indices; hashed into the file names.
        owner: dataset class name, e.g. ``"GPTDataset"``.
        split_name: ``"train"``, ``"valid"`` or ``"test"``.
    """

    def __init__(self, directory: str, description: str, owner: str, split_name: str):
        self.directory = directory
        self.description = description
        self.hash = hashlib.md5(description.encode("utf-8")).hexdigest()
        self._base = f"{self.hash}-{owner}-{split_name}"

    def path(self, name: str) -> str:
        """Path of the cache file ``name`` (``"sample_index.npy"``, ``"description.txt"``)."""
        return os.path.join(self.directory, f"{self._base}-{name}")

    def is_complete(self) -> bool:
        """True when a previous save finished (its description was written last)."""
        return os.path.isfile(self.path("description.txt"))

    def save(self, arrays: Dict[str, np.ndarray]) -> None:
        """Write ``arrays`` as ``{name}.npy`` files, then the description."""
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the index cache directory {self.directory} "
                          f"({err}); set path_to_cache to a writable directory") from err
        for name, array in arrays.items():
            final = self.path(f"{name}.npy")
            tmp = f"{final}.tmp-{os.getpid()}.npy"
            np.save(tmp, array, allow_pickle=False)
            os.replace(tmp, final)
        final = self.path("description.txt")
        tmp = f"{final}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.description)
        os.replace(tmp, final)

    def load(self, names: Iterable[str]) -> Dict[str, np.ndarray]:
        """Memory-map the ``{name}.npy`` files of a complete cache."""
        with open(self.path("description.txt"), encoding="utf-8") as f:
            if f.read() != self.description:
                raise ValueError(f"{self.path('description.txt')}: description differs from "
                                 f"this dataset's (md5 collision or edited file)")
        return {name: np.load(self.path(f"{name}.npy"), allow_pickle=False, mmap_mode="r")
                for name in names}
