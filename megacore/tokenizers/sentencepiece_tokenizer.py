"""SentencePiece tokenizers: ``SentencePieceTokenizer``, ``GPTSentencePieceTokenizer``,
``Llama2Tokenizer`` (Megatron's three flavours over one ``.model`` file).

* ``SentencePieceTokenizer`` adds Megatron's special tokens (``<CLS>``, ``<SEP>``,
  ``<EOD>``, ``<MASK>``, the model's pad/bos/eos pieces, ``<extra_id_i>``) after the
  model's pieces and recognises them literally in the text.
* ``GPTSentencePieceTokenizer`` is the model as is; ``eod`` is the model's ``eos``.
* ``Llama2Tokenizer`` is the same but ``tokenize`` prepends ``bos`` by default.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from megacore.tokenizers.megatron_tokenizer import VocabDictTokenizer, file_digest

__all__ = ["GPTSentencePieceTokenizer", "Llama2Tokenizer", "SentencePieceTokenizer"]


class _SentencePieceBase(VocabDictTokenizer):
    def __init__(self, model_file: str, **identifiers) -> None:
        import sentencepiece

        super().__init__(files_sha256=file_digest([model_file]), **identifiers)
        self._processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self._vocab: Dict[str, int] = {}
        for i in range(self._processor.get_piece_size()):
            self._vocab.setdefault(self._processor.id_to_piece(i), i)
        self._inv_vocab = {i: self._processor.id_to_piece(i)
                           for i in range(self._processor.get_piece_size())}

    def _model_special(self, model_id: int, name: str) -> int:
        if model_id < 0:
            return self._missing(name)
        return model_id

    @property
    def vocab_size(self) -> int:
        # Every piece id counts, including pieces whose text repeats an earlier one.
        return len(self._inv_vocab)


class GPTSentencePieceTokenizer(_SentencePieceBase):
    """The SentencePiece model unchanged; ``eod`` = the model's end-of-sentence id.

    Args:
        model_file: a SentencePiece ``.model`` file.
    """

    def tokenize(self, text: str) -> List[int]:
        return self._processor.encode_as_ids(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._processor.decode_ids([int(i) for i in ids])

    @property
    def pad(self) -> int:
        return self._model_special(self._processor.pad_id(), "padding")

    @property
    def bos(self) -> int:
        return self._model_special(self._processor.bos_id(), "beginning-of-sequence")

    @property
    def eos(self) -> int:
        return self._model_special(self._processor.eos_id(), "end-of-sequence")

    @property
    def eod(self) -> int:
        return self.eos


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Llama-2 style: ``tokenize`` prepends ``bos`` (and appends ``eos`` on request)."""

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        ids = self._processor.encode_as_ids(text)
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])


class SentencePieceTokenizer(_SentencePieceBase):
    """SentencePiece plus Megatron's special tokens, matched literally in the text.

    Args:
        model_file: a SentencePiece ``.model`` file.
        vocab_extra_ids: number of ``<extra_id_i>`` sentinel tokens to add (T5).
    """

    def __init__(self, model_file: str, vocab_extra_ids: int = 0) -> None:
        super().__init__(model_file, vocab_extra_ids=vocab_extra_ids)
        self._special: Dict[str, int] = {}
        self._ids = {}
        for name, token in (("cls", "<CLS>"), ("sep", "<SEP>"), ("eod", "<EOD>"),
                            ("mask", "<MASK>")):
            self._ids[name] = self._add_special(token)
        for name, model_id, fallback in (("pad", self._processor.pad_id(), "<PAD>"),
                                         ("bos", self._processor.bos_id(), "<BOS>"),
                                         ("eos", self._processor.eos_id(), "<EOS>")):
            token = self._processor.id_to_piece(model_id) if model_id >= 0 else fallback
            self._ids[name] = self._add_special(token)
        self.additional_special_tokens = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
        for token in self.additional_special_tokens:
            self._add_special(token)

    def _add_special(self, token: str) -> int:
        if token not in self._vocab:
            new_id = len(self._inv_vocab)
            self._vocab[token] = new_id
            self._inv_vocab[new_id] = token
        self._special[token] = self._vocab[token]
        return self._vocab[token]

    def tokenize(self, text: str) -> List[int]:
        ids: List[int] = []
        start = 0
        while True:
            # The earliest special token wins; among those starting at the same place, the
            # first registered one (a stable, documented order).
            found = [(text.find(t, start), n, t) for n, t in enumerate(self._special)]
            found = [f for f in found if f[0] >= 0]
            if not found:
                break
            position, _, token = min(found)
            ids.extend(self._processor.encode_as_ids(text[start:position]))
            ids.append(self._special[token])
            start = position + len(token)
        ids.extend(self._processor.encode_as_ids(text[start:]))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        special_ids = {i: t for t, i in self._special.items()}
        pieces: List[str] = []
        run: List[int] = []
        for i in map(int, ids):
            if i in special_ids:
                pieces.append(self._processor.decode_ids(run) + " " + special_ids[i] + " ")
                run = []
            else:
                run.append(i)
        pieces.append(self._processor.decode_ids(run))
        return "".join(pieces)

    @property
    def cls(self) -> int:
        return self._ids["cls"]

    @property
    def sep(self) -> int:
        return self._ids["sep"]

    @property
    def eod(self) -> int:
        return self._ids["eod"]

    @property
    def mask(self) -> int:
        return self._ids["mask"]

    @property
    def pad(self) -> int:
        return self._ids["pad"]

    @property
    def bos(self) -> int:
        return self._ids["bos"]

    @property
    def eos(self) -> int:
        return self._ids["eos"]
