"""``HuggingFaceTokenizer`` from a local ``tokenizer.json`` or a directory holding one.

Megatron hands ``--tokenizer-model`` to ``transformers.AutoTokenizer.from_pretrained``,
which reaches for the Hugging Face hub. megacore never does: the path must exist
locally, and the Rust ``tokenizers`` library loads it directly (no ``transformers``
needed). Special tokens (``eos``/``bos``/``pad``) come from ``tokenizer_config.json``
or ``special_tokens_map.json`` beside the file when present. As in Megatron,
``tokenize`` applies the tokenizer's own post-processing (e.g. a Llama ``<s>``).

An instruct model's chat template, when the directory holds one (see
``megacore.tokenizers.chat_template``), is :attr:`HuggingFaceTokenizer.chat_template`
and :meth:`HuggingFaceTokenizer.apply_chat_template` renders conversations with it as
``transformers`` does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

from megacore.tokenizers.chat_template import find_chat_template, render_chat_template
from megacore.tokenizers.megatron_tokenizer import VocabDictTokenizer, file_digest

__all__ = ["HuggingFaceTokenizer"]

_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_SPECIAL_ROLES = ("eos_token", "bos_token", "pad_token", "unk_token", "sep_token", "cls_token",
                  "mask_token")


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
        self.chat_template: Optional[str] = find_chat_template(os.path.dirname(path))
        """The default chat template of the tokenizer's directory (None: no template)."""

    def tokenize(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Ids of ``text``; ``add_special_tokens=False`` skips the post-processing (a
        rendered chat template already holds its special tokens)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(self, messages: List[Dict[str, Any]],
                            add_generation_prompt: bool = True,
                            tokenize: bool = False) -> Union[str, List[int]]:
        """The conversation as prompt text (or its token ids, with no special tokens
        added beyond those the template writes), as ``transformers`` renders it.

        Raises:
            ValueError: the tokenizer has no chat template.
            ChatTemplateError: the template does not accept the messages.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        text = render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    special_tokens=dict(self._special))
        if not tokenize:
            return text
        return self._tokenizer.encode(text, add_special_tokens=False).ids

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
        for role in _SPECIAL_ROLES:
            value = config.get(role)
            if isinstance(value, dict):  # {"content": "</s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                names[role] = value
    return names
