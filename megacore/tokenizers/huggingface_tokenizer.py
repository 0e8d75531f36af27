"""``HuggingFaceTokenizer`` from a local ``tokenizer.json`` or a directory holding one.

Megatron hands ``--tokenizer-model`` to ``transformers.AutoTokenizer.from_pretrained``,
which reaches for the Hugging Face hub. megacore never does: the path must exist
locally, and the Rust ``tokenizers`` library loads it directly (no ``transformers``
needed). Special tokens (``eos``/``bos``/``pad``) come from ``tokenizer_config.json``
or ``special_tokens_map.json`` beside the file when present. As in Megatron,
``tokenize`` applies the tokenizer's own post-processing (e.g. a Llama ``<s>``).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from megacore.tokenizers.megatron_tokenizer import VocabDictTokenizer, file_digest

__all__ = ["HuggingFaceTokenizer"]

_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class HuggingFaceTokenizer(VocabDictTokenizer):
    """Args:
        tokenizer_model: path of a ``tokenizer.json`` or of a directory containing one.

    Raises:
        FileNotFoundError: the path does not exist or holds no ``tokenizer.json``
            (model names such as ``"gpt2"`` are not fetched from the hub).
    """

    def __init__(self, tokenizer_model: str) -> None:
        from tokenizers import Tokenizer

        path = _tokenizer_json_path(tokenizer_model)
        super().__init__(files_sha256=file_digest([path]))
        self._tokenizer = Tokenizer.from_file(path)
        self._vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        self._special = _special_token_names(os.path.dirname(path))

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer.encode(text).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


    def _special_id(self, role: str, description: str) -> int:
        token = self._special.get(role)
        if token is None or token not in self._vocab:
            return self._missing(description)
        return self._vocab[token]

    @property
    def eod(self) -> int:
        return self._special_id("eos_token", "end-of-document (eos_token)")

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def bos(self) -> int:
        return self._special_id("bos_token", "beginning-of-sequence (bos_token)")

    @property
    def pad(self) -> int:
        return self._special_id("pad_token", "padding (pad_token)")


def _tokenizer_json_path(tokenizer_model: str) -> str:
    if os.path.isdir(tokenizer_model):
        path = os.path.join(tokenizer_model, "tokenizer.json")
    else:
        path = tokenizer_model
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"HuggingFaceTokenizer: {path} not found; pass a local tokenizer.json or a "
            f"directory containing one (megacore never downloads tokenizers)")
    return path


def _special_token_names(directory: str) -> Dict[str, Optional[str]]:
    """eos/bos/pad token strings from the config files beside ``tokenizer.json``."""
    names: Dict[str, Optional[str]] = {}
    for filename in reversed(_CONFIG_FILES):  # tokenizer_config.json wins
        config_path = os.path.join(directory, filename)
        if not os.path.isfile(config_path):
            continue
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        for role in ("eos_token", "bos_token", "pad_token"):
            value = config.get(role)
            if isinstance(value, dict):  # {"content": "</s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                names[role] = value
    return names
