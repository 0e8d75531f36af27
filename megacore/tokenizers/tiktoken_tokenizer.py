"""``TikTokenizer``: Megatron-LM's tiktoken-based tokenizer over its JSON vocabulary.

The vocabulary file (``--tokenizer-model``) is a JSON list whose i-th entry is
``{"rank": i, "token_bytes": <base64 of the token's bytes>, "token_str": ...}``; entries
0-255 are the single bytes. Ids: the first ``num_special_tokens`` (1000) ids are special
tokens (``<unk>``, ``<s>``, ``</s>``, ``<mask>``, ``<pad>``, ``<cls>``, ``<sep>`` and then
``<SPECIAL_7>`` ... fillers), and vocabulary entry ``r`` has id ``r + num_special_tokens``;
the vocabulary is cut to ``vocab_size - num_special_tokens`` entries. Text is split by a
pre-tokenization regex (``--tiktoken-pattern v1`` or ``v2``) and merged by byte-pair rank,
by the ``tiktoken`` package. The end of document is ``</s>`` (id 2).

Example: a 300-entry vocabulary with ``vocab_size=1300`` gives ids 0-999 special and
1000-1299 for the entries; the byte ``b"a"`` (entry 97) is id 1097.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Dict, List, Optional, Sequence

from megacore.tokenizers.megatron_tokenizer import MegatronTokenizer, file_digest

__all__ = ["TikTokenizer", "TIKTOKEN_PATTERNS"]

# Pre-tokenization regexes (the published tiktoken "v1"/"v2" split patterns Megatron-LM
# names by these keys).
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
           r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
           r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
_NAMED_SPECIALS = ["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"]


def _load_ranks(path: str, limit: int) -> Dict[bytes, int]:
    """Vocabulary entry bytes -> rank, for the first ``limit`` entries (errors name the
    file and the entry)."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the TikTokenizer vocabulary: {e}") from e
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a TikTokenizer vocabulary is a JSON list of "
                         "{rank, token_bytes, token_str} entries")
    if len(entries) < limit:
        raise ValueError(f"{path}: {len(entries)} entries, but --vocab-size needs {limit} "
                         "(vocab_size - 1000 special tokens); lower --vocab-size")
    ranks: Dict[bytes, int] = {}
    for i, entry in enumerate(entries[:limit]):
        try:
            token = base64.b64decode(entry["token_bytes"], validate=True)
        except (KeyError, TypeError, binascii.Error) as e:
            raise ValueError(f"{path}: entry {i} has no valid base64 token_bytes") from e
        if entry.get("rank") != i or (i < 256 and token != bytes([i])) or token in ranks:
            raise ValueError(f"{path}: entry {i} must have rank {i}"
                             + (f" and be the single byte {i}" if i < 256 else "")
                             + " and a token not seen before")
        ranks[token] = i
    return ranks


class TikTokenizer(MegatronTokenizer):
    """Args:
        vocab_file: the JSON vocabulary (``--tokenizer-model``).
        pattern: ``v1`` or ``v2`` (``--tiktoken-pattern``).
        vocab_size: total ids, special ones included (``--vocab-size``; default 2**17).
        num_special_tokens: ids reserved for special tokens.
    """

    def __init__(self, vocab_file: str, pattern: str = "v2", vocab_size: Optional[int] = None,
                 num_special_tokens: int = 1000) -> None:
        import tiktoken

        if pattern not in TIKTOKEN_PATTERNS:
            raise ValueError(f"--tiktoken-pattern must be v1 or v2, got {pattern!r}")
        vocab_size = int(vocab_size or 2 ** 17)
        if not len(_NAMED_SPECIALS) <= num_special_tokens < vocab_size:
            raise ValueError(f"TikTokenizer: vocab_size {vocab_size} must exceed the "
                             f"{num_special_tokens} special tokens")
        super().__init__(files_sha256=file_digest([vocab_file]), pattern=pattern,
                         vocab_size=vocab_size, num_special_tokens=num_special_tokens)
        self.num_special_tokens = num_special_tokens
        self.special_tokens = _NAMED_SPECIALS + [f"<SPECIAL_{i}>" for i in range(
            len(_NAMED_SPECIALS), num_special_tokens)]
        ranks = _load_ranks(vocab_file, vocab_size - num_special_tokens)
        # Shifting every rank by the same amount keeps the merge order and makes the
        # encoder emit final ids directly.
        self._encoding = tiktoken.Encoding(
            name="megacore-tiktoken", pat_str=TIKTOKEN_PATTERNS[pattern],
            mergeable_ranks={t: r + num_special_tokens for t, r in ranks.items()},
            special_tokens={t: i for i, t in enumerate(self.special_tokens)})
        self._size = vocab_size
        self._inv_vocab = {i: t for i, t in enumerate(self.special_tokens)}
        self._inv_vocab.update({r + num_special_tokens: t.decode("utf-8", errors="replace")
                                for t, r in ranks.items()})

    def tokenize(self, text: str) -> List[int]:
        # Special-token text (e.g. "</s>") becomes its special id, as in Megatron-LM.
        return self._encoding.encode(text, allowed_special="all")

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids])

    @property
    def vocab(self) -> Dict[str, int]:
        return {t: i for i, t in self._inv_vocab.items()}

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return dict(self._inv_vocab)

    @property
    def vocab_size(self) -> int:
        return self._size

    def _special(self, name: str) -> int:
        return self.special_tokens.index(name)

    @property
    def eod(self) -> int:
        return self._special("</s>")

    @property
    def eos(self) -> int:
        return self._special("</s>")

    @property
    def bos(self) -> int:
        return self._special("<s>")

    @property
    def pad(self) -> int:
        return self._special("<pad>")

    @property
    def cls(self) -> int:
        return self._special("<cls>")

    @property
    def sep(self) -> int:
        return self._special("<sep>")

    @property
    def mask(self) -> int:
        return self._special("<mask>")
