"""BERT WordPiece tokenizers (``BertWordPieceLowerCase`` / ``BertWordPieceCase``).

Same ids as the original BERT ``FullTokenizer`` that Megatron wraps: BERT text cleanup,
optional lower-casing with accent stripping, splitting on whitespace and punctuation
(CJK characters one by one), then greedy longest-match WordPiece with ``##``
continuations and ``[UNK]`` for words it cannot cover. The work is done by the Rust
``tokenizers`` library. As in Megatron, ``[BOS]`` and ``[EOS]`` are appended to the
vocabulary when missing, and ``eod`` is ``[EOS]``; ``tokenize`` adds no ``[CLS]``/``[SEP]``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from megacore.tokenizers.megatron_tokenizer import VocabDictTokenizer, file_digest

__all__ = ["BertWordPieceTokenizer", "read_wordpiece_vocab"]


def read_wordpiece_vocab(vocab_file: str) -> Dict[str, int]:
    """``vocab.txt``: one token per line, id = line number (from 0)."""
    vocab: Dict[str, int] = {}
    with open(vocab_file, encoding="utf-8") as f:
        for line in f:
            token = line.rstrip("\n")
            if token and token not in vocab:
                vocab[token] = len(vocab)
    return vocab


class BertWordPieceTokenizer(VocabDictTokenizer):
    """WordPiece over a BERT ``vocab.txt``.

    Args:
        vocab_file: BERT vocabulary, one token per line; must hold ``[CLS]``, ``[SEP]``,
            ``[PAD]``, ``[MASK]`` and ``[UNK]``.
        lower_case: lower-case and strip accents first (``BertWordPieceLowerCase``).
        vocab_extra_ids: number of ``<extra_id_i>`` sentinel tokens to append (T5).
    """

    def __init__(self, vocab_file: str, lower_case: bool = True, vocab_extra_ids: int = 0):
        super().__init__(files_sha256=file_digest([vocab_file]), lower_case=lower_case,
                         vocab_extra_ids=vocab_extra_ids)
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        vocab = read_wordpiece_vocab(vocab_file)
        missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]") if t not in vocab]
        if missing:
            raise ValueError(f"{vocab_file}: BERT vocabulary lacks {', '.join(missing)}")
        self._tokenizer = Tokenizer(models.WordPiece(vocab=dict(vocab), unk_token="[UNK]",
                                                     max_input_chars_per_word=100))
        self._tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=lower_case,
            lowercase=lower_case)
        self._tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tokenizer.decoder = decoders.WordPiece(prefix="##")
        # Appended after the file's tokens, so they never shift an existing id.
        for token in ["[BOS]", "[EOS]"] + [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]:
            vocab.setdefault(token, len(vocab))
        self._vocab = vocab
        self._inv_vocab = {i: t for t, i in vocab.items()}
        self.additional_special_tokens = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        tokens = [self._inv_vocab[int(i)] for i in ids]
        return " ".join(tokens).replace(" ##", "").strip()

    @property
    def cls(self) -> int:
        return self._vocab["[CLS]"]

    @property
    def sep(self) -> int:
        return self._vocab["[SEP]"]

    @property
    def pad(self) -> int:
        return self._vocab["[PAD]"]

    @property
    def mask(self) -> int:
        return self._vocab["[MASK]"]

    @property
    def bos(self) -> int:
        return self._vocab["[BOS]"]

    @property
    def eos(self) -> int:
        return self._vocab["[EOS]"]

    @property
    def eod(self) -> int:
        return self.eos
