"""Every command-line program, as a new user meets it: ``--help`` answers at once with
every flag documented, a bad flag is one ``error:`` line (one, under torchrun too), and
no program edits ``sys.path`` or imports another program."""

import ast
import functools
import glob
import os
import re
import resource
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = sorted(
    os.path.relpath(p, ROOT) for p in
    glob.glob(os.path.join(ROOT, "tools", "*.py"))
    + glob.glob(os.path.join(ROOT, "tools", "*", "*.py"))
    + glob.glob(os.path.join(ROOT, "examples", "*.py"))
    if os.path.basename(p) != "__init__.py")
# tools/checkpoint/inspect.py is a directory (see its __main__.py): run the same way.
PROGRAMS.append(os.path.join("tools", "checkpoint", "inspect.py"))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
# One option of argparse's help: "  --flag METAVAR   help" or the help on the next lines.
OPTION = re.compile(r"^  (-\S.*?|[a-z]\S*)(\s{2,}\S.*)?$")


def _run(args, timeout=60):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, cpu, time.monotonic() - start


@functools.lru_cache(maxsize=None)
def _help(program):
    """``(proc, cpu seconds, wall seconds)`` of ``program --help``, run once per session."""
    return _run([program, "--help"])


def _options_without_help(text):
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        match = OPTION.match(line)
        if not match or match.group(2):
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not re.match(r"^ {8,}\S", following) or following.lstrip().startswith("-"):
            missing.append(match.group(1))
    return missing


def test_every_program_is_found():
    assert "examples/pretrain_gpt.py" in PROGRAMS and "tools/checkpoint/convert.py" in PROGRAMS
    assert len(PROGRAMS) >= 10, PROGRAMS


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_is_fast_and_documents_every_flag(program):
    proc, cpu, wall = _help(program)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("usage:"), text[:200]
    # CPU seconds, not wall time: the shared test machine may be loaded, the work is not.
    assert cpu < 5.0, f"{program} --help took {cpu:.1f} s of CPU ({wall:.1f} s wall)"
    assert _options_without_help(text) == [], program
    assert "(default: None)" not in text
    assert "``" not in text, "reST markup in the help text"
    assert "Traceback" not in proc.stderr


def test_the_help_of_each_program_says_what_it_needs():
    generate = _help("examples/generate_from_checkpoint.py")[0].stdout
    for flag in ("--load", "--tokenizer-type", "--vocab-file", "--merge-file", "--prompt",
                 "--tensor-model-parallel-size"):
        assert flag in generate
    server = _help("tools/run_text_generation_server.py")[0].stdout
    assert "--load" in server and "--port" in server and "--tokenizer-type" in server
    for training_only in ("--lr ", "--train-iters", "--data-path", "--save-interval"):
        assert training_only not in server
    # The model/tokenizer flags a checkpoint records (which must agree with it) grew with
    # 0.2.0's architectures (MLA, MTP, routing, window, RoPE scaling): still well under
    # the 652 lines of the full training parser.
    assert len(server.splitlines()) < 300
    convert = _help("tools/checkpoint/convert.py")[0].stdout
    assert "examples" in convert and "--target-tensor-parallel-size 2" in convert
    loop, cpu, _ = _help("examples/run_simple_train_loop.py")
    assert "| loss" not in loop.stdout and cpu < 5.0  # answers; does not train


def test_programs_import_only_the_library():
    for program in PROGRAMS:
        path = os.path.join(ROOT, program)
        if os.path.isdir(path):
            path = os.path.join(path, "__main__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                assert top not in ("tools", "examples"), (program, node.module)
            if isinstance(node, ast.Attribute) and node.attr == "path" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                pytest.fail(f"{program} uses sys.path")


def test_a_bad_flag_under_torchrun_is_one_error_line(tmp_path):
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "examples/pretrain_gpt.py"]
    model = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "2",
             "--lr", "1e-2", "--train-iters", "1", "--mock-data", "--vocab-size", "97"]
    for extra, expected in (
            (["--global-batch-size", "8", "--no-such-flag"],
             "error: unrecognized arguments: --no-such-flag"),
            (["--global-batch-size", "7"], "error: --global-batch-size 7 must be divisible")):
        proc = _run(run + model + extra, timeout=180)[0]
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
        # No traceback from the ranks: at most torchrun's own failure report, whose root
        # cause is the same line (written to torchrun's error file), not a pointer to docs.
        assert proc.stderr.count("Traceback (most recent call last)") <= 1
        assert "ArgumentValidationError" not in proc.stderr
        assert "To enable traceback see" not in proc.stderr, proc.stderr[-3000:]
        assert f"traceback : {expected}" in proc.stderr, proc.stderr[-3000:]


def test_a_user_error_is_torchruns_reported_root_cause(tmp_path, monkeypatch, capsys):
    """The error file is read by torch's own elastic agent class, not by our reading of it."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from megacore.training.arguments import ArgumentValidationError
    from megacore.training.cli import run_program

    def main():
        raise ArgumentValidationError("--foo 3 needs --bar")

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "1")
    assert run_program(main) == 2
    assert capsys.readouterr().err == ""  # only rank 0 prints
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message == "error: --foo 3 needs --bar"
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    error_file.unlink()
    assert run_program(main) == 2 and not error_file.exists()
