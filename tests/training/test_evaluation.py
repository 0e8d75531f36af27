"""tools/evaluate.py and megacore.training.evaluation against transformers, in every layout.

A tiny random 4-layer GPT-2 (``tests/inference/hf_tiny``) is imported with the converter
(``torch_dist``, so any layout can load it). The dataset holds two documents the HF
model generated greedily (so next-token accuracy is far from 0) and one random
document. The reference is transformers run on exactly the samples ``GPTDataset`` gives
(same windows, same loss mask): its summed negative log-likelihood and argmax hits.

Tolerances: the single process matches transformers within float32 rounding of
different op orders (rtol 1e-5 on the mean loss, measured ~1e-7); layouts match the
single process within rtol 1e-5 (tp splits the softmax sums, cp the attention), and the
accuracy counts are equal.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megacore.datasets.indexed_dataset import IndexedDatasetBuilder
from tests.inference import hf_tiny
from tests.multirank import run_distributed

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 32
LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2"],
           "pp2": ["--pipeline-model-parallel-size", "2"],
           "cp2": ["--context-parallel-size", "2"],
           "pp2-vpp2": ["--pipeline-model-parallel-size", "2",
                        "--num-layers-per-virtual-pipeline-stage", "1"],
           "dp2": []}


def _hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
    return out[0].tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    hf_dir, ckpt, data = str(root / "hf"), str(root / "megacore"), str(root / "data")
    model = hf_tiny.write_hf_model(hf_dir, layers=4)  # 4: pp 2 x vpp 2
    hf_tiny.convert(hf_dir, ckpt, "torch_dist")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(data + ".bin", dtype=np.uint16)
    for document in (_hf_greedy(model, [11, 22], 48), _hf_greedy(model, [7], 40),
                     rng.integers(0, 6000, 45).tolist()):
        builder.add_item(document)
        builder.end_document()
    builder.finalize(data + ".idx")
    # The converted checkpoint carries the HF tokenizer: --load alone finds it.
    argv = ["--load", ckpt, "--data-path", data, "--seq-length", str(SEQ),
            "--micro-batch-size", "1", "--global-batch-size", "2", "--no-progress"]
    return dict(model=model, argv=argv, hf_dir=hf_dir)


def _evaluate(argv, layouts):
    """Rank body: evaluate in each layout; rank 0 also returns the samples."""
    from tools import evaluate as tool

    out = {}
    for name, flags in layouts.items():
        out[name] = tool.main(argv + flags)
    run, _, _ = tool.parse_evaluation_args(argv)
    dataset = tool.build_dataset(run, "all", None)  # collective: every rank builds
    if torch.distributed.get_rank() == 0:
        out["samples"] = [dataset[i] for i in range(len(dataset))]
    return out


def _reference(model, samples):
    nll, hits, tokens = 0.0, 0, 0
    for sample in samples:
        with torch.no_grad():
            logits = model(sample["tokens"].unsqueeze(0)).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        mask = sample["loss_mask"] > 0
        labels = sample["labels"]
        nll -= float(logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)[mask].sum())
        hits += int((logits.argmax(-1) == labels)[mask].sum())
        tokens += int(mask.sum())
    return nll / tokens, hits / tokens, tokens


def test_perplexity_equals_transformers_and_is_the_same_in_every_layout(setup, tmp_path):
    single = run_distributed(_evaluate, 1, args=(setup["argv"], {"single": []}),
                             timeout=300)[0]
    loss, accuracy, tokens = _reference(setup["model"], single["samples"])
    result = single["single"]
    assert result["tokens"] == tokens == 4 * SEQ and result["samples"] == 4
    assert result["iterations"] == 2
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(loss), rel=1e-5)
    assert result["accuracy"] == accuracy and 0.1 < accuracy < 1

    layouts = run_distributed(_evaluate, 2, args=(setup["argv"], LAYOUTS), timeout=300)[0]
    for name in LAYOUTS:
        got = layouts[name]
        assert got["loss"] == pytest.approx(result["loss"], rel=1e-5), name
        assert (got["accuracy"], got["tokens"], got["samples"]) == \
            (result["accuracy"], result["tokens"], result["samples"]), name

    # The command line, with Megatron's --eval-iters: one global batch of 2 samples.
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"),
                           *setup["argv"], "--eval-iters", "1", "--json-out", str(out)],
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["iterations"] == 1 and saved["samples"] == 2 and saved["tokens"] == 2 * SEQ
    assert json.loads(proc.stdout) == saved


def test_bad_invocations_are_named(setup, tmp_path, capsys):
    from tools import evaluate as tool

    with pytest.raises(SystemExit):  # argparse's error: one line naming the flag
        tool.parse_evaluation_args(["--data-path", "x"])
    assert "--load is required" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--data-path is required"):
        tool.parse_evaluation_args([a for a in setup["argv"] if a != "--data-path"][:2])
    with pytest.raises(ValueError, match="eval_iters 50 x global batch 2 = 100 samples"):
        from megacore.training.evaluation import evaluation_sample_indices

        evaluation_sample_indices(4, 2, 50)
