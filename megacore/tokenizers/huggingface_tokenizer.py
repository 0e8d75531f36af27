"""``HuggingFaceTokenizer`` from a local ``tokenizer.json`` or a directory holding one.

Megatron hands ``--tokenizer-model`` to ``transformers.AutoTokenizer.from_pretrained``,
which reaches for the Hugging Face hub. megacore never does: the path must exist
locally, and the Rust ``tokenizers`` library loads it directly (no ``transformers``
needed). Special tokens (``eos``/``bos``/``pad``) come from ``tokenizer_config.json``
or ``special_tokens_map.json`` beside the file when present. As in Megatron,
``tokenize`` applies the tokenizer's own post-processing (e.g. a Llama ``<s>``).

The chat template (``chat_template.jinja`` beside the file, else ``tokenizer_config.json``'s
``chat_template``) renders a list of ``{"role", "content"}`` messages into a prompt, as
``transformers``' ``apply_chat_template(..., tokenize=False)`` does: Jinja2 in a sandbox,
with ``messages``, ``add_generation_prompt``, the special tokens and ``raise_exception``.
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
        self.chat_template: Optional[str] = _chat_template(os.path.dirname(path))
        """The Jinja2 chat template, or None when the tokenizer has none."""

    def tokenize(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Ids of ``text``; ``add_special_tokens=False`` skips the post-processing (a
        rendered chat template already holds its special tokens)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


    def apply_chat_template(self, messages: Sequence[Dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation.

        Raises:
            ValueError: the tokenizer has no chat template, or the template rejects the
                messages (its ``raise_exception`` message).
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (chat_template.jinja or "
                             "tokenizer_config.json chat_template)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        tokens = {role: self._special.get(role) or "" for role in
                  ("bos_token", "eos_token", "pad_token")}
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                **tokens)
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from e

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


def _chat_template(directory: str) -> Optional[str]:
    """``chat_template.jinja`` (transformers 5), else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or named templates: the ``default`` one)."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


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
