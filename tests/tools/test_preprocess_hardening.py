"""preprocess_data.py and merge_datasets.py on hostile input and broken outputs (issue 20):
every per-line failure is ``file:line`` and skipped (or stops under --strict), output
problems are one ``error:`` line naming the path, stale temporaries of a killed run are
removed, and a merge into its own input directory is refused."""

import json
import os
import subprocess
import sys

import pytest

from megacore.datasets import IndexedDataset
from megacore.datasets.preprocess import encoder as encoder_module
from tools import merge_datasets, preprocess_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "examples", "data")
VOCAB, MERGES = os.path.join(DEMO, "vocab.json"), os.path.join(DEMO, "merges.txt")
GOOD = [{"text": f"def parse_{i}(value): return value"} for i in range(4)]
NESTED = '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}"  # far past the recursion limit


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _preprocess(capsys, source, prefix, *extra, workers=1):
    code = preprocess_data.main(
        ["--input", str(source), "--output-prefix", str(prefix), "--tokenizer-type",
         "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES,
         "--workers", str(workers), *extra])
    return code, capsys.readouterr().err


def _error_lines(err):
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("workers", [1, 2])
def test_deeply_nested_json_is_reported_with_its_line_and_skipped(tmp_path, capsys, workers):
    source = _write(tmp_path / "in.jsonl",
                    [json.dumps(GOOD[0]), NESTED, json.dumps(GOOD[1])])
    code, err = _preprocess(capsys, source, tmp_path / "out", workers=workers)
    assert code == 0, err
    assert f"{source}:2: JSON nested too deeply to parse (RecursionError) (skipped)" in err
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 2

    code, err = _preprocess(capsys, source, tmp_path / "strict", "--strict")
    assert code == 1
    assert _error_lines(err) == [f"error: {source}:2: JSON nested too deeply to parse "
                                 f"(RecursionError) (stopped: --strict); no output written"]
    assert not any(name.startswith("strict") for name in os.listdir(tmp_path))


def test_a_memory_error_on_one_line_skips_that_line(tmp_path, capsys, monkeypatch):
    real = encoder_module.parse_json_line

    def parse(line):
        if b"HUGE" in line:
            raise MemoryError()
        return real(line)

    monkeypatch.setattr(encoder_module, "parse_json_line", parse)
    source = _write(tmp_path / "in.jsonl",
                    [json.dumps(GOOD[0]), json.dumps(GOOD[1]), json.dumps({"text": "HUGE"})])
    code, err = _preprocess(capsys, source, tmp_path / "out")
    assert code == 0, err
    assert f"{source}:3: out of memory while encoding this line" in err
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 2


def test_output_problems_are_one_error_line_naming_the_path(tmp_path, capsys):
    source = _write(tmp_path / "in.jsonl", [json.dumps(d) for d in GOOD])
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    code, err = _preprocess(capsys, source, blocker / "sub" / "out")
    assert code == 1
    assert _error_lines(err) == [f"error: {blocker / 'sub'}: cannot create the output "
                                 f"directory: a file is in the way (check --output-prefix); "
                                 f"no output written"]

    (tmp_path / "out_text_document.bin").mkdir()  # the output name is taken by a directory
    code, err = _preprocess(capsys, source, tmp_path / "out")
    assert code == 1
    assert _error_lines(err) == [f"error: {tmp_path / 'out_text_document.bin'}: output path is "
                                 f"a directory; no output written"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_read_only_output_directory_is_one_error_line(tmp_path, capsys):
    source = _write(tmp_path / "in.jsonl", [json.dumps(d) for d in GOOD])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = _preprocess(capsys, source, locked / "out")
    finally:
        locked.chmod(0o700)
    assert code == 1
    assert _error_lines(err) == [f"error: {locked}: output directory is not writable; "
                                 f"no output written"]


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, capsys):
    source = _write(tmp_path / "in.jsonl", [json.dumps(d) for d in GOOD])
    dead = tmp_path / f"out_text_document.bin.tmp-{_dead_pid()}"
    dead.write_bytes(b"\0" * 4096)
    dead_idx = tmp_path / f"out_text_document.idx.tmp-{_dead_pid()}"
    dead_idx.write_bytes(b"MMIDIDX")
    alive = tmp_path / "out_text_document.bin.tmp-1"  # pid 1 is running: not ours to remove
    alive.write_bytes(b"\0")
    code, err = _preprocess(capsys, source, tmp_path / "out")
    assert code == 0, err
    assert not dead.exists() and not dead_idx.exists() and alive.exists()
    assert f"removed {dead} (4,096 bytes), left by an earlier run" in err
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 4


def test_merge_refuses_an_output_inside_its_input_directory(tmp_path, capsys):
    parts = tmp_path / "parts"
    for name, docs in (("a", GOOD[:2]), ("b", GOOD[2:])):
        source = _write(tmp_path / f"{name}.jsonl", [json.dumps(d) for d in docs])
        assert _preprocess(capsys, source, parts / name)[0] == 0
    before = sorted(os.listdir(parts))
    code = merge_datasets.main(["--input", str(parts), "--output-prefix", str(parts / "all")])
    err = capsys.readouterr().err
    assert code == 1
    assert _error_lines(err) == [
        f"error: --output-prefix {parts / 'all'} lies in the --input directory {parts}: the "
        f"merged dataset would become one of the inputs of the next merge (every document "
        f"twice); write it to another directory; no output written"]
    assert sorted(os.listdir(parts)) == before
    assert merge_datasets.main(["--input", str(parts), "--output-prefix",
                                str(tmp_path / "all")]) == 0
    assert len(IndexedDataset(str(tmp_path / "all"))) == 4
