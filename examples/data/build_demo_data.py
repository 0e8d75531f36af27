"""Regenerate the bundled demo corpus and its GPT-2-format BPE vocabulary.

Outputs, beside this script:

* ``demo_corpus.jsonl`` -- one JSON object per Python standard-library module:
  ``{"title": module name, "text": its docstrings}`` (module, classes, functions), each
  document capped at ``--max-doc-chars`` characters. The standard library is under the
  PSF licence, which allows redistribution (see README.md).
* ``vocab.json`` + ``merges.txt`` -- a byte-level BPE trained on that corpus with the
  ``tokenizers`` library, in GPT-2's file format: ids 0..255 are the byte symbols, then
  one id per merge in merge order, and ``<|endoftext|>`` is the last id.

Run with the Python whose standard library should be read (the shipped files come from
CPython 3.11.7)::

    python examples/data/build_demo_data.py
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
END_OF_TEXT = "<|endoftext|>"


def module_files(stdlib_dir: str):
    """Top-level modules and package ``__init__``/submodules, in a fixed order."""
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    for root, dirs, files in os.walk(stdlib_dir):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


def module_text(path: str, max_chars: int) -> str:
    """The module's docstrings: module first, then each class and function, by name."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # old-style escapes in docstrings
        tree = ast.parse(source)
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(module_doc)
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and not node.name.startswith("_"):
                parts.append(f"{node.name}: {doc}")
    return "\n\n".join(parts)[:max_chars]


def build_corpus(stdlib_dir: str, out_path: str, max_doc_chars: int, min_doc_chars: int) -> int:
    count = 0
    with open(out_path, "w", encoding="utf-8") as out:
        for path in module_files(stdlib_dir):
            text = module_text(path, max_doc_chars)
            if len(text) < min_doc_chars:
                continue
            title = os.path.relpath(path, stdlib_dir)[:-3].replace(os.sep, ".")
            out.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
            count += 1
    return count


def train_vocab(corpus_path: str, vocab_size: int, vocab_path: str, merges_path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def texts():
        with open(corpus_path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = tokenizer.model.save(tmp)
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            merges = f.read()
    vocab[END_OF_TEXT] = len(vocab)  # GPT-2 layout: end-of-text is the last id
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    if not merges.startswith("#version: 0.2\n"):
        merges = "#version: 0.2\n" + merges
    if not merges.endswith("\n"):
        merges += "\n"  # Megatron's legacy reader drops the last line otherwise
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write(merges)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stdlib-dir", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--out-dir", default=HERE)
    parser.add_argument("--vocab-size", type=int, default=6000)
    parser.add_argument("--max-doc-chars", type=int, default=3000)
    parser.add_argument("--min-doc-chars", type=int, default=200)
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print(f"note: the shipped files were built from Python 3.11.7's standard library; "
              f"this is {sys.version.split()[0]}, so the output will differ", file=sys.stderr)
    corpus = os.path.join(args.out_dir, "demo_corpus.jsonl")
    count = build_corpus(args.stdlib_dir, corpus, args.max_doc_chars, args.min_doc_chars)
    train_vocab(corpus, args.vocab_size, os.path.join(args.out_dir, "vocab.json"),
                os.path.join(args.out_dir, "merges.txt"))
    print(f"wrote {count} documents ({os.path.getsize(corpus)} bytes) and a "
          f"{args.vocab_size}-token vocabulary to {args.out_dir}")


if __name__ == "__main__":
    main()
