"""Megatron's ``--data-path`` and ``--split`` strings, parsed and checked.

* ``--data-path`` is a single prefix (``data/corpus_text_document``), several prefixes
  (used one epoch each, blended in proportion to their sizes), or weighted pairs
  ``"0.3 data/a_text_document 0.7 data/b_text_document"``.
* ``--split "969,30,1"`` gives train/valid/test fractions of every dataset's sequences;
  missing entries are 0 (``"99,1"`` = no test split).

A split is cut from a dataset of ``N`` sequences as the contiguous range
``[round(b0 * N), round(b1 * N))`` between cumulative bookends. Worked example:
``--split 969,30,1`` -> bookends 0, 0.969, 0.999, 1.0; with N = 1000 the splits are
train [0, 969), valid [969, 999), test [999, 1000).
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import List, Optional, Sequence, Tuple, Union

__all__ = [
    "Blend",
    "Split",
    "convert_split_vector_to_split_matrix",
    "get_blend_from_list",
    "normalize",
    "parse_and_normalize_split",
    "split_range",
]

Blend = Tuple[List[str], Optional[List[float]]]
"""(prefixes, weights or None)."""


class Split(Enum):
    """The three dataset splits, in ``--split`` order."""

    train = 0
    valid = 1
    test = 2


def normalize(weights: Sequence[float]) -> List[float]:
    """``weights`` scaled to sum to 1; raises ``ValueError`` if negative or all zero."""
    weights = [float(w) for w in weights]
    if any(w < 0 or math.isnan(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def parse_and_normalize_split(split: str) -> List[float]:
    """``"969,30,1"`` -> ``[0.969, 0.03, 0.001]`` (``,`` or ``/`` separated, up to 3)."""
    # Quotes are ignored, as Megatron-LM does: its Llama 3 example passes "--split '99,1,0'"
    # inside a bash array, so the quotes reach the program.
    pieces = [p.strip(" '\"") for p in re.split(r"[,/]", split) if p.strip(" '\"")]
    try:
        values = [float(p) for p in pieces]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to 3 comma-separated numbers such "
                         f"as '969,30,1'") from None
    if not 1 <= len(values) <= len(Split):
        raise ValueError(f"--split {split!r}: expected 1 to 3 numbers, got {len(values)}")
    try:
        return normalize(values + [0.0] * (len(Split) - len(values)))
    except ValueError:
        raise ValueError(f"--split {split!r}: numbers must be non-negative and not all "
                         f"zero") from None


def convert_split_vector_to_split_matrix(
        split_vector: Sequence[float]) -> List[Optional[Tuple[float, float]]]:
    """Normalized split fractions -> per-split ``(begin, end)`` bookends, ``None`` for a
    split of weight 0."""
    bookends = [0.0]
    for fraction in split_vector:
        bookends.append(bookends[-1] + fraction)
    return [None if begin == end else (begin, end)
            for begin, end in zip(bookends[:-1], bookends[1:])]


def split_range(bookends: Optional[Tuple[float, float]], num_elements: int) -> Tuple[int, int]:
    """The ``[begin, end)`` element range of a split (empty for ``None``)."""
    if bookends is None:
        return 0, 0
    return int(round(bookends[0] * num_elements)), int(round(bookends[1] * num_elements))


def get_blend_from_list(blend: Union[None, str, Sequence[str]]) -> Optional[Blend]:
    """Parse ``--data-path`` (a list of words, or one whitespace-separated string).

    Returns:
        ``(prefixes, weights)``; ``weights`` is ``None`` when no weights were given.
        ``None`` for an empty or missing value.

    Raises:
        ValueError: words that are neither all ``weight prefix`` pairs nor all prefixes.
    """
    if blend is None:
        return None
    words = blend.split() if isinstance(blend, str) else [w for w in blend for w in w.split()]
    if not words:
        return None
    if len(words) % 2 == 0:
        weights = [_as_float(w) for w in words[0::2]]
        if all(w is not None for w in weights):
            prefixes = words[1::2]
            if any(_as_float(p) is not None for p in prefixes):
                raise ValueError(f"--data-path {' '.join(words)!r}: expected 'weight prefix' "
                                 f"pairs, found two numbers in a row")
            return prefixes, normalize(weights)
    if any(_as_float(w) is not None for w in words):
        raise ValueError(f"--data-path {' '.join(words)!r}: give either 'weight prefix' pairs "
                         f"or prefixes only, not a mixture")
    return list(words), None


def _as_float(word: str) -> Optional[float]:
    try:
        return float(word)
    except ValueError:
        return None
