"""The tokenizer that travels with a converted checkpoint.

A Hugging Face directory keeps its tokenizer beside the weights (``tokenizer.json``,
``tokenizer_config.json`` with the chat template, or ``chat_template.jinja`` ...). On
import the converter copies those files into ``<save dir>/tokenizer/`` and records
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer`` in the saved run
configuration, with the path relative to the save directory (so the directory can move);
``--load`` and the text-generation server resolve it there
(:func:`resolve_checkpoint_paths`); a megacore-to-megacore conversion carries such a
tokenizer directory along (:func:`carry_checkpoint_tokenizer`). The vocabulary
granularity is recorded as the embedding's row count, so ``pretrain``'s padded
vocabulary (the tokenizer's size rounded up to ``--make-vocab-size-divisible-by``) is
exactly the checkpoint's rows even when the
tokenizer has fewer tokens than the embedding (Qwen pads its table). On export
(``--saver hf``) the files of the recorded tokenizer are copied beside the weights: a
``HuggingFaceTokenizer`` directory's files, or a GPT-2 BPE ``vocab.json``/``merges.txt``.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Optional

from megacore.checkpointing.conversion.manifest import ConversionError

__all__ = ["TOKENIZER_FILES", "TOKENIZER_SUBDIR", "hf_tokenizer_files", "tokenizer_config",
           "copy_files", "exported_tokenizer_files", "resolve_checkpoint_paths",
           "carry_checkpoint_tokenizer"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "tokenizer.model", "vocab.json", "merges.txt")
"""Files of a Hugging Face tokenizer (whichever exist are copied)."""

TOKENIZER_SUBDIR = "tokenizer"
"""Where an imported tokenizer lives inside a megacore save directory."""

_PATH_FIELDS = ("tokenizer_model", "vocab_file", "merge_file")


def hf_tokenizer_files(hf_dir: str) -> List[str]:
    """Tokenizer files present in a Hugging Face directory (names)."""
    return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, f))]


def tokenizer_config(hf_dir: str, embedding_rows: int) -> Optional[Dict[str, Any]]:
    """The run-configuration sections recording ``hf_dir``'s tokenizer (None: it has no
    ``tokenizer.json``, the format megacore's ``HuggingFaceTokenizer`` reads).

    Raises:
        ConversionError: the tokenizer has more tokens than the embedding has rows.
    """
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return None
    from megacore.tokenizers import HuggingFaceTokenizer

    size = HuggingFaceTokenizer(hf_dir).vocab_size
    if size > embedding_rows:
        raise ConversionError(f"{hf_dir}/tokenizer.json has {size} tokens but the word "
                              f"embedding only {embedding_rows} rows")
    return {"data": {"tokenizer_type": "HuggingFaceTokenizer",
                     "tokenizer_model": TOKENIZER_SUBDIR},
            "gpt": {"make_vocab_size_divisible_by": embedding_rows}}


def copy_files(src_dir: str, names: List[str], dst_dir: str) -> List[str]:
    """Copy ``names`` from ``src_dir`` into ``dst_dir`` (created); returns the names."""
    os.makedirs(dst_dir, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return list(names)


def _resolve(path: str, roots: List[str]) -> Optional[str]:
    if os.path.isabs(path):
        return path if os.path.exists(path) else None
    for root in roots:
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return candidate
    return path if os.path.exists(path) else None


def resolve_checkpoint_paths(config: Dict[str, Any], load_dir: str) -> Dict[str, Any]:
    """``config`` with relative tokenizer paths made absolute when they exist under the
    checkpoint (``load_dir`` or, for an iteration directory, its parent); in place."""
    data = config.get("data") or {}
    roots = [load_dir, os.path.dirname(os.path.abspath(load_dir))]
    for field in _PATH_FIELDS:
        value = data.get(field)
        if isinstance(value, str) and value and not os.path.isabs(value):
            for root in roots:
                candidate = os.path.join(root, value)
                if os.path.exists(candidate):
                    data[field] = os.path.abspath(candidate)
                    break
    return config


def exported_tokenizer_files(config: Optional[Dict[str, Any]], load_dir: str,
                             dst_dir: str) -> List[str]:
    """Copy the tokenizer a megacore checkpoint records into a Hugging Face directory;
    returns the files written (none when no tokenizer, or a kind HF cannot read, is
    recorded).

    Raises:
        ConversionError: a recorded tokenizer file does not exist.
    """
    data = (config or {}).get("data") or {}
    kind = data.get("tokenizer_type")
    roots = [load_dir, os.path.dirname(os.path.abspath(load_dir))]
    if kind == "HuggingFaceTokenizer" and data.get("tokenizer_model"):
        found = _resolve(data["tokenizer_model"], roots)
        if found is None:
            raise ConversionError(f"the checkpoint's tokenizer {data['tokenizer_model']!r} "
                                  f"(--tokenizer-model) was not found under {load_dir}")
        src = found if os.path.isdir(found) else os.path.dirname(found)
        return copy_files(src, hf_tokenizer_files(src), dst_dir)
    if kind == "GPT2BPETokenizer":
        written = []
        for field, name in (("vocab_file", "vocab.json"), ("merge_file", "merges.txt")):
            found = _resolve(data.get(field) or "", roots)
            if found is None:
                raise ConversionError(f"the checkpoint's {field} {data.get(field)!r} was not "
                                      f"found (GPT2BPETokenizer)")
            shutil.copyfile(found, os.path.join(dst_dir, name))
            written.append(name)
        return written
    return []


def carry_checkpoint_tokenizer(config: Optional[Dict[str, Any]], load_dir: str,
                               save_dir: str) -> List[str]:
    """Copy tokenizer files a megacore checkpoint keeps inside itself (relative paths in
    its configuration) to the same relative place under ``save_dir``; returns them."""
    data = (config or {}).get("data") or {}
    roots = [load_dir, os.path.dirname(os.path.abspath(load_dir))]
    copied = []
    for field in _PATH_FIELDS:
        value = data.get(field)
        if not isinstance(value, str) or not value or os.path.isabs(value):
            continue
        for root in roots:
            src = os.path.join(root, value)
            if not os.path.exists(src):
                continue
            dst = os.path.join(save_dir, value)
            if os.path.isdir(src):
                copy_files(src, hf_tokenizer_files(src), dst)
            else:
                os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
                shutil.copyfile(src, dst)
            copied.append(value)
            break
    return copied
