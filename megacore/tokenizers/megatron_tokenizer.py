"""The tokenizer interface every megacore tokenizer implements (Megatron's names).

Why an interface: the preprocessing tool, the datasets and the text-generation server
need only a handful of operations (text -> ids, ids -> text, the special ids, the vocab
size), and code written against Megatron's tokenizers uses these exact names. Special
tokens a tokenizer does not have raise ``NotImplementedError`` naming the tokenizer, so
asking GPT-2 for a ``[MASK]`` id fails loudly instead of returning ``None``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any, Dict, Iterable, List, Sequence

__all__ = ["MegatronTokenizer", "VocabDictTokenizer", "file_digest"]


class MegatronTokenizer(ABC):
    """Base class: ``tokenize``, ``detokenize``, ``vocab``, ``inv_vocab``, ``vocab_size``
    and the special ids (``eod``, ``pad``, ``bos``, ``eos``, ``cls``, ``sep``, ``mask``).

    ``unique_identifiers`` describes the tokenizer for dataset cache keys: two tokenizers
    with equal identifiers must produce equal ids.
    """

    def __init__(self, **identifiers: Any) -> None:
        self.unique_identifiers: Dict[str, Any] = {"class": type(self).__name__, **identifiers}

    @abstractmethod
    def tokenize(self, text: str) -> List[int]:
        """Ids of ``text`` (no special tokens added unless the tokenizer says so)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    @property
    @abstractmethod
    def vocab(self) -> Dict[str, int]:
        """Token string -> id."""

    @property
    @abstractmethod
    def inv_vocab(self) -> Dict[int, str]:
        """Id -> token string."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (before any padding for tp)."""

    def _missing(self, name: str):
        raise NotImplementedError(f"{type(self).__name__} has no {name} token")

    @property
    def eod(self) -> int:
        """End-of-document id, appended by ``preprocess_data.py --append-eod``."""
        return self._missing("end-of-document")

    @property
    def pad(self) -> int:
        """Padding id."""
        return self._missing("padding")

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id."""
        return self._missing("beginning-of-sequence")

    @property
    def eos(self) -> int:
        """End-of-sequence id."""
        return self._missing("end-of-sequence")

    @property
    def cls(self) -> int:
        """Classification id."""
        return self._missing("classification")

    @property
    def sep(self) -> int:
        """Separator id."""
        return self._missing("separator")

    @property
    def mask(self) -> int:
        """Mask id."""
        return self._missing("mask")


class VocabDictTokenizer(MegatronTokenizer):
    """A tokenizer whose vocabulary is a token -> id dict it keeps in ``self._vocab``
    (and ``self._inv_vocab`` for id -> token); subclasses fill both in ``__init__``."""

    _vocab: Dict[str, int]
    _inv_vocab: Dict[int, str]

    @property
    def vocab(self) -> Dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self._inv_vocab

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)


def file_digest(paths: Iterable[str]) -> str:
    """sha256 over the contents of ``paths``: identifies tokenizer files in cache keys
    without depending on where the files happen to be."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
