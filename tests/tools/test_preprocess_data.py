"""tools/preprocess_data.py and tools/merge_datasets.py: contents, byte-identical outputs
across workers and input forms, every bad-input message, and no partial outputs."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megacore.datasets import IndexedDataset
from megacore.tokenizers import GPT2BPETokenizer
from tools import merge_datasets, preprocess_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "examples", "data")
VOCAB, MERGES = os.path.join(DEMO, "vocab.json"), os.path.join(DEMO, "merges.txt")
EOD = 5999


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2BPETokenizer(VOCAB, MERGES)


@pytest.fixture(scope="module")
def documents():
    with open(os.path.join(DEMO, "demo_corpus.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f][:60]


def write_jsonl(path, documents):
    with open(path, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps(document) + "\n")
    return str(path)


def preprocess(input_path, prefix, *extra, workers=1, capsys=None):
    argv = ["--input", str(input_path), "--output-prefix", str(prefix),
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB,
            "--merge-file", MERGES, "--workers", str(workers), *extra]
    code = preprocess_data.main(argv)
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def read_bytes(prefix):
    with open(prefix + ".bin", "rb") as f, open(prefix + ".idx", "rb") as g:
        return f.read(), g.read()


def document_ids(prefix):
    ds = IndexedDataset(prefix)
    docs = ds.document_indices
    return [np.concatenate([ds[i] for i in range(docs[d], docs[d + 1])]).tolist()
            for d in range(len(docs) - 1)]


def test_contents_and_header(tmp_path, documents, tokenizer, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", documents)
    code, err = preprocess(source, tmp_path / "out", "--append-eod", "--log-interval", "25",
                           capsys=capsys)
    assert code == 0
    prefix = str(tmp_path / "out_text_document")
    expected = [tokenizer.tokenize(d["text"]) + [EOD] for d in documents]
    assert document_ids(prefix) == expected
    _, idx = read_bytes(prefix)
    assert idx[:9] == b"MMIDIDX\x00\x00" and idx[9:17] == (1).to_bytes(8, "little")
    assert idx[17] == 8  # uint16 for a 6000-token vocabulary
    assert idx[18:26] == len(documents).to_bytes(8, "little")       # one sequence per document
    assert idx[26:34] == (len(documents) + 1).to_bytes(8, "little")
    assert "Processed 25 documents (" in err and "Processed 50 documents (" in err
    assert "docs/s" in err and "tokens/s" in err and "MB/s" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out_text_document.bin",
                                            "out_text_document.idx"]


def test_identical_for_workers_and_input_forms(tmp_path, documents, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", documents)
    with open(source, "rb") as f, gzip.open(tmp_path / "in.jsonl.gz", "wb") as g:
        g.write(f.read())
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "a.jsonl", documents[:25])
    write_jsonl(tmp_path / "dir" / "b.jsonl", documents[25:])
    runs = {
        "1 worker": (source, 1),
        "2 workers": (source, 2),
        "gzip": (str(tmp_path / "in.jsonl.gz"), 2),
        "directory": (str(tmp_path / "dir"), 2),
        "glob": (str(tmp_path / "dir" / "*.jsonl"), 1),
    }
    outputs = {}
    for name, (input_path, workers) in runs.items():
        out = tmp_path / name.replace(" ", "_")
        assert preprocess(input_path, out, "--append-eod", workers=workers,
                          capsys=capsys)[0] == 0
        outputs[name] = read_bytes(f"{out}_text_document")
    reference = outputs.pop("1 worker")
    for name, produced in outputs.items():
        assert produced == reference, name


def test_several_keys_and_max_documents(tmp_path, documents, tokenizer, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", documents)
    code, _ = preprocess(source, tmp_path / "out", "--json-keys", "text", "title",
                         "--max-documents", "7", workers=2, capsys=capsys)
    assert code == 0
    assert document_ids(str(tmp_path / "out_title_document")) == [
        tokenizer.tokenize(d["title"]) for d in documents[:7]]
    assert document_ids(str(tmp_path / "out_text_document")) == [
        tokenizer.tokenize(d["text"]) for d in documents[:7]]


def test_split_sentences_and_keep_newlines(tmp_path, tokenizer, capsys):
    text = "First sentence here. Second one follows!\n\nA new paragraph? Yes.\n"
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": text}, {"text": "One only."}])
    assert preprocess(source, tmp_path / "plain", "--split-sentences", "--append-eod",
                      capsys=capsys)[0] == 0
    ds = IndexedDataset(str(tmp_path / "plain_text_sentence"))
    sentences = [tokenizer.detokenize(ds[i].tolist()) for i in range(len(ds))]
    assert sentences == ["First sentence here.", "Second one follows!", "A new paragraph?",
                         "Yes.<|endoftext|>", "One only.<|endoftext|>"]
    assert ds.document_indices.tolist() == [0, 4, 5]
    assert preprocess(source, tmp_path / "kept", "--split-sentences", "--keep-newlines",
                      capsys=capsys)[0] == 0
    ds = IndexedDataset(str(tmp_path / "kept_text_sentence"))
    kept = [tokenizer.detokenize(ds[i].tolist()) for i in range(ds.document_indices[1])]
    # Line breaks between sentences survive; punkt drops only the text's final whitespace.
    assert len(kept) == 4 and "".join(kept) == text.rstrip()


# ----------------------------------------------------------------- bad input

GOOD = b'{"text": "A good line of text."}\n'
BAD_LINES = {
    "malformed JSON": (b'{"text": "unterminated\n',
                       r"malformed JSON: Unterminated string starting at \(column 10\)"),
    "missing key": (b'{"body": "x"}\n', r"missing key 'text' \(keys present: 'body'\)"),
    "non-string value": (b'{"text": 42}\n', r"key 'text' holds a int, expected a string"),
    "invalid UTF-8": (b'{"text": "caf\xe9"}\n', r"invalid UTF-8 at byte 13"),
    "empty document": (b'{"text": ""}\n', r"empty document: key 'text' gives no tokens"),
    "not an object": (b'["text"]\n', r"expected a JSON object, got a list"),
    "blank line": (b"\n", r"blank line"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_reported_and_skipped(tmp_path, case, capsys):
    line, message = BAD_LINES[case]
    source = tmp_path / "in.jsonl"
    source.write_bytes(GOOD + line + GOOD)
    code, err = preprocess(source, tmp_path / "out", workers=2, capsys=capsys)
    assert code == 0
    assert re.search(rf"{re.escape(str(source))}:2: {message}", err), err
    assert "skipped 1 bad input line" in err
    assert len(document_ids(str(tmp_path / "out_text_document"))) == 2


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_strict_stops_and_leaves_no_output(tmp_path, case, capsys):
    line, message = BAD_LINES[case]
    source = tmp_path / "in.jsonl"
    source.write_bytes(GOOD + line + GOOD)
    code, err = preprocess(source, tmp_path / "out", "--strict", workers=2, capsys=capsys)
    assert code == 1
    assert re.search(rf"error: {re.escape(str(source))}:2: {message}", err), err
    assert "(stopped: --strict)" in err and "no output written" in err
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no .bin/.idx, no temporary files


def test_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code, err = preprocess(empty, tmp_path / "out", capsys=capsys)
    assert code == 1
    assert f"{empty}: empty input file (no lines)" in err
    assert "no documents written" in err and os.listdir(tmp_path) == ["empty.jsonl"]
    (tmp_path / "dir").mkdir()
    shutil.move(str(empty), tmp_path / "dir" / "a.jsonl")
    (tmp_path / "dir" / "b.jsonl").write_bytes(GOOD)
    code, err = preprocess(tmp_path / "dir", tmp_path / "out", capsys=capsys)
    assert code == 0 and "a.jsonl: empty input file" in err
    code, err = preprocess(tmp_path / "dir", tmp_path / "strict", "--strict", capsys=capsys)
    assert code == 1 and not os.path.exists(tmp_path / "strict_text_document.bin")


def test_all_lines_bad_and_missing_input(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"body": 1}\n')
    code, err = preprocess(source, tmp_path / "out", capsys=capsys)
    assert code == 1 and "no documents written" in err
    assert os.listdir(tmp_path) == ["in.jsonl"]
    code, err = preprocess(tmp_path / "nope.jsonl", tmp_path / "out", capsys=capsys)
    assert code == 1 and "nope.jsonl: no such file, directory or glob match" in err


def test_corrupt_gzip(tmp_path, documents, capsys):
    data = gzip.compress("".join(json.dumps(d) + "\n" for d in documents).encode())
    (tmp_path / "in.jsonl.gz").write_bytes(data[:len(data) // 2])
    code, err = preprocess(tmp_path / "in.jsonl.gz", tmp_path / "out", workers=2, capsys=capsys)
    assert code == 1 and "cannot read input" in err
    assert os.listdir(tmp_path) == ["in.jsonl.gz"]


def test_existing_output_replaced_only_on_success(tmp_path, documents, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", documents[:5])
    assert preprocess(source, tmp_path / "out", capsys=capsys)[0] == 0
    before = read_bytes(str(tmp_path / "out_text_document"))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(GOOD + b"{oops\n")
    assert preprocess(bad, tmp_path / "out", "--strict", capsys=capsys)[0] == 1
    assert read_bytes(str(tmp_path / "out_text_document")) == before


# ----------------------------------------------------------------- merging, CLI, Megatron

def test_merge_equals_preprocessing_the_whole(tmp_path, documents, capsys):
    write_jsonl(tmp_path / "all.jsonl", documents)
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "a.jsonl", documents[:20])
    write_jsonl(tmp_path / "b.jsonl", documents[20:])
    for name in ("a", "b"):
        assert preprocess(tmp_path / f"{name}.jsonl", tmp_path / "parts" / name, "--append-eod",
                          capsys=capsys)[0] == 0
    assert preprocess(tmp_path / "all.jsonl", tmp_path / "whole", "--append-eod",
                      capsys=capsys)[0] == 0
    assert merge_datasets.main(["--input", str(tmp_path / "parts"),
                                "--output-prefix", str(tmp_path / "merged")]) == 0
    assert read_bytes(str(tmp_path / "merged")) == read_bytes(str(tmp_path / "whole_text_document"))
    with open(tmp_path / "parts" / "b_text_document.idx", "r+b") as f:
        f.truncate(20)
    assert merge_datasets.main(["--input", str(tmp_path / "parts"),
                                "--output-prefix", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert "b_text_document.idx: truncated index file" in err
    assert not any(n.startswith("again") for n in os.listdir(tmp_path))


def test_command_line(tmp_path, documents):
    source = write_jsonl(tmp_path / "in.jsonl", documents[:10])
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", source,
         "--output-prefix", str(tmp_path / "cli"), "--tokenizer-type", "GPT2BPETokenizer",
         "--vocab-file", VOCAB, "--merge-file", MERGES, "--append-eod", "--workers", "2"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Done: 10 documents" in result.stderr
    assert len(IndexedDataset(str(tmp_path / "cli_text_document"))) == 10


def test_same_bytes_as_megatron_builder(tmp_path, documents, tokenizer, capsys):
    """Optional: Megatron's preprocessing writes each document through add_document."""
    pytest.importorskip("megatron.core.datasets.indexed_dataset", reason="megatron-core missing")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    source = write_jsonl(tmp_path / "in.jsonl", documents)
    assert preprocess(source, tmp_path / "ours", "--append-eod", workers=2,
                      capsys=capsys)[0] == 0
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for document in documents:
        ids = tokenizer.tokenize(document["text"]) + [EOD]
        builder.add_document(ids, [len(ids)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    assert read_bytes(str(tmp_path / "ours_text_document")) == read_bytes(str(tmp_path / "theirs"))
