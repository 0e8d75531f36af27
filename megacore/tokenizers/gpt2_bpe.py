"""GPT-2 byte-level BPE from a local ``vocab.json`` + ``merges.txt`` (never the network).

Megatron's ``GPT2BPETokenizer`` is the pure-Python GPT-2 algorithm: split text with the
GPT-2 regex, map each piece's UTF-8 bytes to printable characters, then repeatedly merge
the adjacent pair with the lowest merge rank. This class gives the same ids much faster by
handing the files to ``tiktoken`` (Rust; ~6x faster than Hugging Face's fast tokenizer on
the shared corpus). tiktoken ranks a merge by the id of the merged token, so it needs the
ids of merge results to increase in merge order, as in OpenAI's files and in files
trained by the ``tokenizers`` library; any other file is served by ``tokenizers``' BPE,
which ranks by merge order directly.

A literal ``<|endoftext|>`` in the text is encoded as ordinary characters (as Megatron's
legacy tokenizer does); the id is only added by ``--append-eod``.

The tiktoken tables are cached on disk by the files' digest (:mod:`.bpe_cache`), so a
second load skips parsing the merges; ``vocab``/``inv_vocab`` are read on first use.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property, lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

from megacore.tokenizers import bpe_cache
from megacore.tokenizers.megatron_tokenizer import VocabDictTokenizer, file_digest

__all__ = ["GPT2BPETokenizer", "GPT2_SPLIT_PATTERN", "bytes_to_unicode", "read_merges"]

logger = logging.getLogger(__name__)

# The pre-tokenization regex of GPT-2 (needs the ``regex`` module's \p classes).
GPT2_SPLIT_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                      r"""|\s+(?!\S)|\s+""")

END_OF_TEXT = "<|endoftext|>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the other 68 bytes map, in increasing byte order, to U+0100, U+0101, ...
    so that every token string in ``vocab.json`` is printable.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def read_merges(merge_file: str) -> List[Tuple[str, str]]:
    """The merge pairs of ``merge_file`` in rank order (``#version`` header skipped).

    Megatron's legacy reader drops the file's last line, so a file without a final
    newline loses its last merge there; this reader keeps it and warns instead.
    """
    with open(merge_file, encoding="utf-8") as f:
        content = f.read()
    if content and not content.endswith("\n"):
        logger.warning("%s does not end with a newline: Megatron's legacy GPT-2 tokenizer "
                       "would drop its last merge", merge_file)
    merges = []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{merge_file}:{number}: expected 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class GPT2BPETokenizer(VocabDictTokenizer):
    """GPT-2 byte-level BPE, id-exact with Megatron's and Hugging Face's GPT-2 tokenizers.

    Args:
        vocab_file: ``vocab.json`` (token string -> id) in GPT-2's format.
        merge_file: ``merges.txt`` (``#version`` header, one ``left right`` per line).

    Raises:
        ValueError: ``vocab.json`` has no ``<|endoftext|>`` token (needed for ``eod``).
    """

    def __init__(self, vocab_file: str, merge_file: str,
                 cache_dir: Optional[str] = bpe_cache.DEFAULT_CACHE_DIR) -> None:
        digest = file_digest([vocab_file, merge_file])
        super().__init__(files_sha256=digest)
        self._vocab_file = vocab_file
        cached = bpe_cache.load_ranks(cache_dir, digest)
        if cached is not None:
            mergeable, special, info = cached
            self._backend = _TiktokenBackend.from_ranks(mergeable, special, vocab_file)
            self._eod, self._size = info["eod"], info["vocab_size"]
            return
        vocab = self._vocab
        if END_OF_TEXT not in vocab:
            raise ValueError(f"{vocab_file}: no {END_OF_TEXT} token, which GPT2BPETokenizer "
                             f"uses as its end-of-document id")
        self._eod, self._size = vocab[END_OF_TEXT], len(vocab)
        merges = read_merges(merge_file)
        if _ids_follow_merge_order(vocab, merges):
            mergeable, special = _tiktoken_ranks(vocab, merges)
            self._backend = _TiktokenBackend.from_ranks(mergeable, special, vocab_file)
            bpe_cache.store_ranks(cache_dir, digest, mergeable, special,
                                  {"eod": self._eod, "vocab_size": self._size})
        else:
            logger.info("%s: ids of merged tokens do not follow merge order; using the "
                        "`tokenizers` BPE (slower) instead of tiktoken", vocab_file)
            self._backend = _TokenizersBackend(vocab, merges)

    @cached_property
    def _vocab(self) -> Dict[str, int]:
        with open(self._vocab_file, encoding="utf-8") as f:
            return json.load(f)

    @cached_property
    def _inv_vocab(self) -> Dict[int, str]:
        return {i: t for t, i in self._vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self._size

    def tokenize(self, text: str) -> List[int]:
        return self._backend.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._backend.decode(ids)

    @property
    def backend_name(self) -> str:
        """``"tiktoken"`` or ``"tokenizers"``: which library encodes."""
        return self._backend.name

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod


def _ids_follow_merge_order(vocab: Dict[str, int], merges: List[Tuple[str, str]]) -> bool:
    """Whether tiktoken (ranks = ids of merged tokens) merges exactly like GPT-2 BPE."""
    symbols = bytes_to_unicode().values()
    if any(s not in vocab for s in symbols):
        return False
    previous = -1
    for left, right in merges:
        merged_id = vocab.get(left + right)
        # A missing result, a repeated one, or an id out of merge order changes tiktoken's
        # choice of which pair to merge first.
        if merged_id is None or merged_id <= previous:
            return False
        previous = merged_id
    return True


def _tiktoken_ranks(vocab: Dict[str, int], merges: List[Tuple[str, str]]
                    ) -> Tuple[Dict[bytes, int], Dict[str, int]]:
    """tiktoken's tables: raw token bytes -> rank (= id), and the special tokens."""
    # Token string -> raw bytes: map each printable stand-in back to its byte value
    # (str.translate + latin-1 runs in C; a per-character loop costs ~0.1 s here).
    to_latin1 = {ord(c): b for b, c in bytes_to_unicode().items()}

    def raw(token: str) -> bytes:
        return token.translate(to_latin1).encode("latin-1")

    mergeable = {raw(s): vocab[s] for s in bytes_to_unicode().values()}
    for left, right in merges:
        mergeable[raw(left + right)] = vocab[left + right]
    # Every other vocabulary entry (<|endoftext|>, added tokens) is never produced by
    # merging; registering it as special lets decode() map its id back.
    ranked = set(mergeable.values())
    special = {t: i for t, i in vocab.items() if i not in ranked}
    return mergeable, special


class _TiktokenBackend:
    name = "tiktoken"

    def __init__(self, encoding) -> None:
        self._encoding = encoding

    @classmethod
    def from_ranks(cls, mergeable: Dict[bytes, int], special: Dict[str, int],
                   label: str) -> "_TiktokenBackend":
        import tiktoken

        return cls(tiktoken.Encoding(name=f"gpt2-bpe:{label}", pat_str=GPT2_SPLIT_PATTERN,
                                     mergeable_ranks=mergeable, special_tokens=special))

    def encode(self, text: str) -> List[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids), errors="replace")


class _TokenizersBackend:
    name = "tokenizers"

    def __init__(self, vocab: Dict[str, int], merges: List[Tuple[str, str]]):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self._tokenizer = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                  use_regex=True)
        self._tokenizer.decoder = decoders.ByteLevel()

    def encode(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)
