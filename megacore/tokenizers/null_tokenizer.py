"""``NullTokenizer``: text is already ids, written as space-separated integers.

For pipelines that tokenize elsewhere, and for benchmarks that must not measure a
tokenizer. ``vocab_size`` ids ``0 .. vocab_size-1`` come from the data; one more id,
``vocab_size``, is the end-of-document token, so the reported vocabulary size is
``vocab_size + 1`` (as in Megatron).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from megacore.tokenizers.megatron_tokenizer import MegatronTokenizer

__all__ = ["NullTokenizer"]


class NullTokenizer(MegatronTokenizer):
    """Args:
        vocab_size: number of data ids (the end-of-document id is this number).
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) <= 0:
            raise ValueError(f"NullTokenizer needs a positive vocab_size, got {vocab_size}")
        super().__init__(vocab_size=int(vocab_size))
        self._size_without_eod = int(vocab_size)

    def tokenize(self, text: str) -> List[int]:
        try:
            return [int(piece) for piece in text.split()]
        except ValueError as err:
            raise ValueError(f"NullTokenizer expects space-separated integers: {err}") from err

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab(self) -> Dict[str, int]:
        return {str(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: str(i) for i in range(self.vocab_size)}

    @property
    def vocab_size(self) -> int:
        return self._size_without_eod + 1

    @property
    def eod(self) -> int:
        return self._size_without_eod

    @property
    def eos(self) -> int:
        return self._size_without_eod
