"""Chat templates of Hugging Face tokenizers: where to find them and how to render them.

An instruct model's tokenizer carries a Jinja template that turns a conversation
(``[{"role": "user", "content": "Hi"}, ...]``) into the prompt text the model was tuned
on. The checkpoint converter keeps the tokenizer files beside an imported model, so a
served model renders conversations exactly as ``transformers``'
``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.

:func:`find_chat_template` is the one place that knows where a template is stored in a
tokenizer directory, in the order ``transformers`` reads them:

1. ``chat_template.jinja`` (what ``save_pretrained`` writes since transformers 4.43);
2. ``chat_template.json`` (``{"chat_template": ...}``, written by processors);
3. the ``chat_template`` entry of ``tokenizer_config.json``: a string, or a list of
   ``{"name", "template"}`` of which the one named ``default`` is used.

:func:`render_chat_template` renders with the same Jinja settings as ``transformers``
(a sandboxed, immutable environment; ``trim_blocks`` and ``lstrip_blocks``; the
``loopcontrols`` extension; ``tojson`` keeping non-ASCII text; ``raise_exception`` and
``strftime_now``) and the same variables (``messages``, ``add_generation_prompt``,
``tools``, ``documents`` and the special-token strings such as ``bos_token``).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Dict, List, Optional

__all__ = ["ChatTemplateError", "find_chat_template", "render_chat_template"]

_JINJA_FILE = "chat_template.jinja"
_JSON_FILE = "chat_template.json"
_TOKENIZER_CONFIG = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """A chat template that cannot be read or rendered (the message names the file or
    the template's own complaint)."""


def find_chat_template(directory: str) -> Optional[str]:
    """The default chat template stored in a tokenizer ``directory`` (None if none).

    Raises:
        ChatTemplateError: a template file that exists but cannot be read as documented.
    """
    jinja_path = os.path.join(directory, _JINJA_FILE)
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    for filename in (_JSON_FILE, _TOKENIZER_CONFIG):
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get("chat_template")
        except (ValueError, AttributeError) as error:
            raise ChatTemplateError(f"{path}: not a JSON object: {error}") from error
        if value is not None:
            return _default_template(value, path)
    return None


def _default_template(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ChatTemplateError(f"{path}: chat_template must be a string or a list of "
                            "{name, template} entries with one named 'default'")


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"the chat template does not compile: {error}") from error


def render_chat_template(template: str, messages: List[Dict[str, Any]], *,
                         add_generation_prompt: bool = True,
                         special_tokens: Optional[Dict[str, str]] = None) -> str:
    """The prompt text of ``messages`` under ``template``.

    Args:
        template: the Jinja source (see :func:`find_chat_template`).
        messages: ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: end with the tokens that open the assistant's turn.
        special_tokens: ``{"bos_token": "<s>", "eos_token": "</s>", ...}`` as the
            template may use them.

    Raises:
        ChatTemplateError: the template does not compile, or refuses the messages.
    """
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               tools=None, documents=None, **(special_tokens or {}))
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"the chat template failed on these messages: {error}") \
            from error
