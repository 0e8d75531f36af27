"""Megatron-LM's own launch scripts, run unchanged apart from sizes, paths and iteration
counts (tests/training/megatron_scripts/), through torchrun on 2 CPU ranks (gloo):
GPT-3 175B (pipeline parallel 2, fp16, step batch-size schedule, GPT-2 BPE data), Llama 3
8B (tensor parallel 2 with sequence parallelism, bf16, mock data; its fp8 branch stops
naming --fp8-format) and Mixtral 8x7B (expert parallel 2, Llama-2 SentencePiece data).

Flags owned by other issues are left out of the copies with a comment naming the issue
(--attention-backend: issue 19).
"""

import io
import json
import os
import socket
import subprocess

import pytest

from tests.training.test_pretrain_gpt import ROOT, SCRIPT
from tools import preprocess_data

SCRIPTS = os.path.join(ROOT, "tests", "training", "megatron_scripts")
DEMO = os.path.join(ROOT, "examples", "data")
VOCAB, MERGES = os.path.join(DEMO, "vocab.json"), os.path.join(DEMO, "merges.txt")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """30,000 short documents: enough for the smallest split of Mixtral's --split
    99990,8,2 to hold one. Tokenized with GPT-2 BPE and with a tiny Llama-2 SentencePiece
    model trained here."""
    import sentencepiece

    tmp = tmp_path_factory.mktemp("megatron_scripts")
    with open(os.path.join(DEMO, "demo_corpus.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    pieces = [t[i:i + 40] for t in texts for i in range(0, len(t), 40)]
    corpus = tmp / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for k in range(30000):
            f.write(json.dumps({"text": pieces[k % len(pieces)]}) + "\n")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(pieces[:2000]),
                                             model_writer=model, vocab_size=300,
                                             model_type="unigram", minloglevel=2)
    sp_model = tmp / "tokenizer.model"
    sp_model.write_bytes(model.getvalue())
    common = ["--input", str(corpus), "--append-eod", "--workers", "1"]
    assert preprocess_data.main(common + ["--output-prefix", str(tmp / "gpt2"),
                                          "--tokenizer-type", "GPT2BPETokenizer",
                                          "--vocab-file", VOCAB, "--merge-file", MERGES]) == 0
    assert preprocess_data.main(common + ["--output-prefix", str(tmp / "llama2"),
                                          "--tokenizer-type", "Llama2Tokenizer",
                                          "--tokenizer-model", str(sp_model)]) == 0
    return {"gpt2": str(tmp / "gpt2_text_document"), "llama2": str(tmp / "llama2_text_document"),
            "sp_model": str(sp_model)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_script(name, args, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", PRETRAIN_SCRIPT=SCRIPT,
               MASTER_PORT=str(_free_port()), PYTHONPATH=ROOT, **env)
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, name), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    return proc, proc.stdout + proc.stderr


def _iterations(output):
    return [line for line in output.splitlines() if "consumed samples:" in line]


def _assert_trained(proc, output, ckpt):
    assert proc.returncode == 0, output[-4000:]
    assert len(_iterations(output)) == 4, output[-4000:]
    assert f"WARNING: --load {ckpt}: no checkpoint found; training from scratch" in output
    assert f"saved checkpoint at iteration 4 to {ckpt}" in output
    assert "test loss at iteration 4" in output


def test_gpt3_175b_script(tmp_path, data):
    ckpt = tmp_path / "ckpt"
    proc, out = _run_script("train_gpt3_175b_distributed.sh",
                            [ckpt, tmp_path / "tb", VOCAB, MERGES, data["gpt2"]])
    _assert_trained(proc, out, ckpt)
    # --step-batch-size-schedule "0:2 0.064K:4": 2 samples, then 4 from 64 tokens on.
    assert [int(line.split("global batch size:")[1].split("|")[0]) for line in
            _iterations(out)] == [2, 4, 4, 4]


def test_llama3_8b_script_bf16_and_its_fp8_branch(tmp_path):
    ckpt = tmp_path / "bf16" / "ckpt"
    proc, out = _run_script("train_llama3_8b_h100_fp8.sh", [ckpt, tmp_path / "bf16" / "tb"],
                            DTYPE="bf16")
    _assert_trained(proc, out, ckpt)
    assert ("megacore: accepted with no effect on this backend (kernel/fusion choices, see "
            "docs/megatron_flags.md): --use-mcore-models, --cross-entropy-loss-fusion") in out
    assert len([line for line in out.splitlines() if "no effect on this backend" in line]) == 1
    traces = os.listdir(tmp_path / "bf16" / "tb")
    assert any(t.endswith(".pt.trace.json") for t in traces), traces  # --profile
    proc, out = _run_script("train_llama3_8b_h100_fp8.sh", [tmp_path / "fp8" / "ckpt",
                                                            tmp_path / "fp8" / "tb"])
    assert "--fp8-format hybrid needs Transformer Engine's fp8 layers on a CUDA GPU" in out
    assert not _iterations(out), "stops before training"


def test_mixtral_8x7b_script(tmp_path, data):
    ckpt = tmp_path / "ckpt"
    proc, out = _run_script("train_mixtral_8x7b_distributed.sh",
                            [ckpt, data["sp_model"], data["llama2"]])
    _assert_trained(proc, out, ckpt)
    assert ("WARNING: --sequence-parallel needs --tensor-model-parallel-size > 1; disabled "
            "(as Megatron-LM does)") in out
    assert "--no-masked-softmax-fusion, --use-mcore-models, --no-position-embedding" in out
