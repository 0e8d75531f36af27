"""Hugging Face import/export against the ``transformers`` implementation (test-only).

For GPT-2, Llama (GQA: 4 heads, 2 key/value groups) and Mixtral (4 experts, top-2), a
tiny random HF model is saved with ``save_pretrained`` (safetensors), converted to a
megacore checkpoint at tp/ep > 1, loaded into ``GPTModel`` and run: its fp32 logits
match HF's within atol 2e-5 / rtol 1e-4 (different but equivalent op orders: fused vs
split QKV, tanh-GeLU and softmax implementations, expert summation order). Exporting it
back gives safetensors bitwise equal to the original (HF -> megacore -> HF), which
``from_pretrained`` loads to the same logits. The megacore side uses the converter's
description (``activation="gelu_tanh"`` for GPT-2's ``gelu_new``, the HF norm epsilon).
"""

import json
import os

import pytest
import torch

from megacore.checkpointing.conversion import (
    GPTDescription,
    convert_checkpoint,
    description_from_hf_config,
)
from tests.checkpointing.conversion import fixtures as fx
from tests.multirank import run_distributed

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB, SEQ = 61, 8


def _hf_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=VOCAB,
                                      n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=24, vocab_size=VOCAB,
                                       max_position_embeddings=SEQ, rms_norm_eps=1e-5)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(num_hidden_layers=2, hidden_size=16,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=24, vocab_size=VOCAB,
                                         max_position_embeddings=SEQ, num_local_experts=4,
                                         num_experts_per_tok=2, rms_norm_eps=1e-5)
        model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0: perturb them
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def _megacore_logits(load_dir, desc_dict, tp, pp, ep):
    """Rank body: build the model from the description, load, return logits."""
    desc = GPTDescription(**desc_dict)
    from megacore.checkpointing import load_checkpoint

    model = fx.build_model(desc, tp, pp, ep, seed=5)
    load_checkpoint([model], None, None, load_dir=load_dir, no_load_rng=True,
                    no_load_optim=True)
    return fx.pipeline_logits(model, fx.tokens())


def _safetensors(directory):
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if not os.path.isfile(index_path):
        return safetensors_torch.load_file(os.path.join(directory, "model.safetensors"))
    index = json.load(open(index_path))
    out = {}
    for filename in sorted(set(index["weight_map"].values())):
        out.update(safetensors_torch.load_file(os.path.join(directory, filename)))
    return out


def _desc_dict(hf_dir):
    desc = description_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))
    return {k: getattr(desc, k) for k in desc.__dataclass_fields__ if k != "config_dict"}


# HF and megacore compute the same function with different op orders (fused QKV, expert
# sums, GeLU/softmax kernels): float32 rounding only.
TOL = dict(atol=2e-5, rtol=1e-4)
CASES = [("gpt2", "torch", 2, 1, 1), ("llama", "torch_dist", 2, 1, 1),
         ("mixtral", "torch", 1, 1, 2)]


@pytest.mark.parametrize("kind, fmt, tp, pp, ep", CASES, ids=[c[0] for c in CASES])
def test_hf_import_matches_transformers_and_exports_bitwise(tmp_path, kind, fmt, tp, pp, ep):
    model = _hf_model(kind)
    hf_dir = tmp_path / "hf"
    # GPT-2 in several shards (the loader follows the index), the others in one file.
    model.save_pretrained(hf_dir, max_shard_size="8KB" if kind == "gpt2" else "1GB")
    reference = _hf_logits(model, fx.tokens())

    mc_dir = tmp_path / "megacore"
    report = convert_checkpoint(load_dir=str(hf_dir), save_dir=str(mc_dir), saver="megacore",
                                ckpt_format=fmt, target_tensor_parallel_size=tp,
                                target_pipeline_parallel_size=pp,
                                target_expert_parallel_size=ep, progress=False)
    assert report.loader == "hf"
    results = run_distributed(_megacore_logits, tp * pp * ep,
                              args=(str(mc_dir), _desc_dict(hf_dir), tp, pp, ep))
    logits = [r for r in results if r is not None][0]
    torch.testing.assert_close(logits, reference, **TOL)

    back = tmp_path / "hf_back"
    convert_checkpoint(load_dir=str(mc_dir), save_dir=str(back), saver="hf",
                       max_shard_size=4096, progress=False)
    original, exported = _safetensors(hf_dir), _safetensors(back)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert len(set(json.load(open(back / "model.safetensors.index.json"))["weight_map"]
                   .values())) > 1  # 4 KiB shards: several files
    reloaded = type(model).from_pretrained(back).eval()
    torch.testing.assert_close(_hf_logits(reloaded, fx.tokens()), reference, rtol=0, atol=0)


def test_megacore_to_hf_to_megacore_is_bitwise_and_logits_match(tmp_path):
    """A megacore GPT trained state (tp=2, pp=2 legacy, tanh GeLU) exported to GPT-2 runs
    in transformers with megacore's logits, and comes back bitwise."""
    run_distributed(fx.save_stepped, 4, args=(str(tmp_path / "src"), "gpt", 2, 2, 1))
    src = tmp_path / "src" / "torch"
    hf_dir = tmp_path / "hf"
    convert_checkpoint(load_dir=str(src), save_dir=str(hf_dir), saver="hf", progress=False)
    cfg = json.load(open(hf_dir / "config.json"))
    assert cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["activation_function"] == "gelu_new"
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    megacore_logits = [r[0] for r in run_distributed(fx.load_and_logits, 4, args=(
        {(2, 2, 1): str(src)}, "gpt", [(2, 2, 1)], True)) if r[0] is not None][0]
    torch.testing.assert_close(_hf_logits(hf, fx.tokens()), megacore_logits, **TOL)

    back = tmp_path / "back"
    convert_checkpoint(load_dir=str(hf_dir), save_dir=str(back), saver="megacore",
                       ckpt_format="torch", target_tensor_parallel_size=2,
                       target_pipeline_parallel_size=2, progress=False)
    for rank_dir in sorted(os.listdir(src / "iter_0000005")):
        a = torch.load(src / "iter_0000005" / rank_dir / "model_optim_rng.pt",
                       weights_only=True)["model"]
        b = torch.load(back / "iter_0000000" / rank_dir / "model_optim_rng.pt",
                       weights_only=True)["model"]
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), rank_dir
