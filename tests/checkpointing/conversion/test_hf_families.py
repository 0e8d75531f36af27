"""The Hugging Face families Megatron users bring, against ``transformers`` itself.

For each family a tiny random model (2 layers, hidden 32, vocabulary 61, seeded, no hub)
and a tiny word-level ``tokenizer.json`` (with a chat template) are saved with
``save_pretrained``, then:

* imported (``--loader hf``) at tp 1 and at tp 2 or pp 2: megacore's fp32 logits equal
  ``transformers``' within atol 2e-5 / rtol 1e-4 (the same function with other op orders:
  fused vs split QKV, kernels of softmax/GeLU/RMSNorm);
* served from the converted checkpoint with ``--load`` alone (model flags, the sliding
  window, RoPE scaling, the activation and the tokenizer all come from the checkpoint)
  through the HTTP server (``PUT /api``, greedy): the tokens and text equal
  ``transformers``' ``generate``; Mistral's prompts are longer than its window, so the
  banded mask matters in the prefill and in every KV-cache decode step; and
  ``POST /v1/chat/completions`` renders the carried chat template as ``transformers``'
  ``apply_chat_template`` does (the reply equals its greedy generation);
* exported back (``--saver hf``): safetensors bitwise equal to the source, the tokenizer
  files byte-identical, and ``from_pretrained`` gives exactly the source's logits.

Families: Llama 3.1 ``rope_parameters`` of type ``llama3`` (original context 16, so every
frequency band is hit by head dim 8), Mistral ``sliding_window`` 4, Qwen2 (q/k/v biases),
Qwen3 (per-head q/k RMSNorm, head dim 16 != hidden / heads), GPT-2 (``gelu_new`` =
``--openai-gelu``). HF's init std is raised to 0.3 so that greedy choices are not
near-ties that float rounding could flip.
"""

import json
import os

import pytest
import torch

from megacore.checkpointing.conversion import (
    ConversionError,
    GPTDescription,
    HFSource,
    convert_checkpoint,
    description_from_hf_config,
)
from tests.checkpointing.conversion import fixtures as fx
from tests.multirank import run_distributed

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 61
SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = ("{{ bos_token }} {% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w1 {% endif %}")
MESSAGES = [{"role": "system", "content": "w4 w6"}, {"role": "user", "content": "w9 w30 w12"}]
TOL = dict(atol=2e-5, rtol=1e-4)
PROMPTS = ["w7 w12 w3 w40 w9 w22 w5 w31 w18 w2", "w50 w8 w11"]
NEW_TOKENS = 12
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _tokenizer():
    words = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _hf_model(kind):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB,
                  max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.3,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB,
                                      n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, initializer_range=0.3, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama3":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            rope_parameters=dict(LLAMA3_ROPE), **common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            sliding_window=4, **common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0: perturb them
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _save_hf(kind, hf_dir):
    model = _hf_model(kind)
    model.save_pretrained(hf_dir)
    _tokenizer().save_pretrained(hf_dir)
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def _hf_greedy(model, tokenizer):
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=2, pad_token_id=0)
        out.append(gen[0].tolist())
    return out, [tokenizer.decode(t) for t in out]


def _hf_chat(model, tokenizer):
    """transformers' chat: the template's text, tokenized without special tokens, greedy;
    the reply without its end-of-sequence token."""
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2,
                             pad_token_id=0)[0, ids.size(1):].tolist()
    return tokenizer.decode(gen[:-1] if gen and gen[-1] == 2 else gen)


def _desc_dict(hf_dir):
    """The description the converter imports (config.json read against the weights: e.g.
    DeepSeek's ``num_nextn_predict_layers`` without MTP weights is dropped)."""
    source = HFSource(hf_dir)
    source.close()
    desc = source.description
    return {k: getattr(desc, k) for k in desc.__dataclass_fields__ if k != "config_dict"}


def _logits_in_layouts(ckpts, desc_dict):
    """Rank body: logits of each ``(tp, pp) -> checkpoint`` layout (world 2)."""
    from megacore.checkpointing import load_checkpoint

    desc, out = GPTDescription(**desc_dict), []
    for (tp, pp), load_dir in ckpts:
        model = fx.build_model(desc, tp, pp, 1, seed=5)
        load_checkpoint([model], None, None, load_dir=load_dir, no_load_rng=True,
                        no_load_optim=True)
        out.append(fx.pipeline_logits(model, fx.tokens()))
    return out


def _serve_greedy(load_dir):
    """Rank body (world 1): serve ``--load load_dir`` and ask ``PUT /api`` greedily."""
    from fastapi.testclient import TestClient

    from megacore.inference.generation_service import GenerationService, ServiceConfig
    from megacore.inference.server import ServerConfig, create_app
    from tools import run_text_generation_server as tool

    run, args = tool.parse_serving_args(["--load", load_dir, "--max-batch-size", "2"])
    controller = tool.build_controller(run, args)
    tokenizer = tool.get_tokenizer(run)
    service = GenerationService(controller, ServiceConfig(batch_wait_s=0.002)).start()
    try:
        with TestClient(create_app(service, tokenizer, ServerConfig())) as client:
            response = client.put("/api", json={"prompts": PROMPTS, "temperature": 0.0,
                                                "tokens_to_generate": NEW_TOKENS})
            chat = client.post("/v1/chat/completions", json={
                "messages": MESSAGES, "temperature": 0.0, "max_tokens": NEW_TOKENS})
    finally:
        service.stop()
    assert response.status_code == 200, response.text
    assert chat.status_code == 200, chat.text
    body = response.json()
    return (body["tokens"], body["text"], chat.json()["choices"][0]["message"]["content"],
            run_summary(run))


def run_summary(run):
    return dict(window_size=run.model.window_size,
                activation=run.model.activation_func.__name__,
                rope_scaling=run.gpt.use_rope_scaling, tokenizer=run.data.tokenizer_type)


def _safetensors(directory):
    index = json.load(open(os.path.join(directory, "model.safetensors.index.json")))
    out = {}
    for filename in sorted(set(index["weight_map"].values())):
        out.update(safetensors_torch.load_file(os.path.join(directory, filename)))
    return out


# (family, second layout (tp, pp))
CASES = [("llama3", (2, 1)), ("mistral", (2, 1)), ("qwen2", (2, 1)), ("qwen3", (1, 2)),
         ("gpt2", (1, 2))]
EXPECTED = {"llama3": dict(rope_scaling=True, window_size=None, activation="silu"),
            "mistral": dict(rope_scaling=False, window_size=(3, 0), activation="silu"),
            "qwen2": dict(rope_scaling=False, window_size=None, activation="silu"),
            "qwen3": dict(rope_scaling=False, window_size=None, activation="silu"),
            "gpt2": dict(rope_scaling=False, window_size=None, activation="openai_gelu")}


@pytest.mark.parametrize("kind, layout", CASES, ids=[c[0] for c in CASES])
def test_family_imports_serves_and_exports_like_transformers(tmp_path, kind, layout):
    hf_dir = str(tmp_path / "hf")
    model = _save_hf(kind, hf_dir)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    reference = _hf_logits(model, fx.tokens())

    ckpts = [((1, 1), str(tmp_path / "tp1"))]
    ckpts.append((layout, str(tmp_path / f"tp{layout[0]}pp{layout[1]}")))
    for (tp, pp), directory in ckpts:
        convert_checkpoint(load_dir=hf_dir, save_dir=directory, saver="megacore",
                           ckpt_format="torch" if pp == 1 else "torch_dist",
                           target_tensor_parallel_size=tp, target_pipeline_parallel_size=pp,
                           progress=False)
    per_rank = run_distributed(_logits_in_layouts, 2, args=(ckpts, _desc_dict(hf_dir)))
    for index in range(len(ckpts)):  # the last pipeline stage of each layout has them
        logits = [r[index] for r in per_rank if r[index] is not None]
        torch.testing.assert_close(logits[0], reference, **TOL)

    # The tokenizer (with its chat template) travelled into the checkpoint.
    copied = tmp_path / "tp1" / "tokenizer"
    assert json.load(open(copied / "tokenizer_config.json")).get("chat_template") == \
        CHAT_TEMPLATE or (copied / "chat_template.jinja").read_text() == CHAT_TEMPLATE

    tokens, text, reply, summary = run_distributed(_serve_greedy, 1, args=(ckpts[0][1],))[0]
    want_tokens, want_text = _hf_greedy(model, tokenizer)
    assert summary == dict(EXPECTED[kind], tokenizer="HuggingFaceTokenizer")
    assert tokens == want_tokens
    assert text == want_text
    assert reply == _hf_chat(model, tokenizer) and reply  # the chat template is used
    if kind == "mistral":
        assert len(tokenizer(PROMPTS[0])["input_ids"]) > 4  # longer than the window

    # A layout change keeps the tokenizer inside the checkpoint.
    relaid = tmp_path / "relaid"
    convert_checkpoint(load_dir=ckpts[0][1], save_dir=str(relaid), saver="megacore",
                       target_tensor_parallel_size=layout[0],
                       target_pipeline_parallel_size=layout[1], progress=False)
    assert sorted(os.listdir(relaid / "tokenizer")) == sorted(os.listdir(copied))

    back = tmp_path / "hf_back"
    convert_checkpoint(load_dir=str(relaid), save_dir=str(back), saver="hf",
                       max_shard_size=16384, progress=False)
    original = safetensors_torch.load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = _safetensors(back)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    for name in os.listdir(hf_dir):
        if name.startswith(("tokenizer", "chat_template")):
            assert (back / name).read_bytes() == open(os.path.join(hf_dir, name), "rb").read()
    reloaded = type(model).from_pretrained(back).eval()
    torch.testing.assert_close(_hf_logits(reloaded, fx.tokens()), reference, rtol=0, atol=0)


def _llama_config(**overrides):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
           "vocab_size": VOCAB}
    cfg.update(overrides)
    return cfg


def test_unsupported_config_fields_are_refused_naming_them(tmp_path):
    for field in ("rope_parameters", "rope_scaling"):
        with pytest.raises(ConversionError, match=f"config.json {field}.rope_type 'yarn' is "
                                                  "not supported"):
            description_from_hf_config(_llama_config(**{field: {"rope_type": "yarn",
                                                                "factor": 4.0}}))
    with pytest.raises(ConversionError, match="lacks 'low_freq_factor'"):
        description_from_hf_config(_llama_config(rope_parameters={"rope_type": "llama3",
                                                                  "factor": 8.0}))
    with pytest.raises(ConversionError, match="config.json use_sliding_window"):
        description_from_hf_config(dict(_llama_config(), architectures=["Qwen2ForCausalLM"],
                                        use_sliding_window=True, sliding_window=4))
    with pytest.raises(ConversionError, match="config.json attention_bias"):
        description_from_hf_config(_llama_config(attention_bias=True))
    # Older files: rope_scaling with "type"; Llama has no sliding window (ignored key).
    desc = description_from_hf_config(_llama_config(rope_scaling={"type": "default"},
                                                    sliding_window=4))
    assert desc.window_size is None and not desc.rope_scaling


def test_export_refuses_what_the_architecture_cannot_hold():
    from megacore.checkpointing.conversion import hf_config_from_description

    desc = description_from_hf_config(dict(_llama_config(), architectures=[
        "MistralForCausalLM"], sliding_window=4))
    assert desc.window_size == (3, 0)
    assert hf_config_from_description(desc, "MistralForCausalLM")["sliding_window"] == 4
    with pytest.raises(ConversionError, match="LlamaForCausalLM cannot represent this model: "
                                              r"has no sliding window \(window_size \(3, 0\)"):
        hf_config_from_description(desc, "LlamaForCausalLM")
    desc.window_size = (3, 2)
    with pytest.raises(ConversionError, match=r"window_size \(3, 2\): a Mistral sliding "
                                              r"window is \(w - 1, 0\)"):
        hf_config_from_description(desc, "MistralForCausalLM")
    qwen3 = description_from_hf_config(dict(_llama_config(), architectures=["Qwen3ForCausalLM"]))
    with pytest.raises(ConversionError, match="Qwen2ForCausalLM cannot represent this model: "
                                              "needs q/k/v biases"):
        hf_config_from_description(qwen3, "Qwen2ForCausalLM")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    hf_dir = str(tmp_path / "hf")
    _save_hf("qwen2", hf_dir)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    weights = safetensors_torch.load_file(os.path.join(hf_dir, "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:40].contiguous()
    config["vocab_size"] = 40
    json.dump(config, open(os.path.join(hf_dir, "config.json"), "w"))
    safetensors_torch.save_file(weights, os.path.join(hf_dir, "model.safetensors"),
                                metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"tokenizer.json has 61 tokens but the word "
                                              "embedding only 40 rows"):
        convert_checkpoint(load_dir=hf_dir, save_dir=str(tmp_path / "mc"), saver="megacore",
                           progress=False)


def test_hf_saver_writes_a_gpt2_bpe_tokenizer_that_transformers_reads(tmp_path):
    """A pretrain checkpoint records --vocab-file/--merge-file (relative to where it
    ran, or inside the checkpoint): --saver hf copies them as vocab.json/merges.txt."""
    from megacore.checkpointing.conversion.tokenizer_files import exported_tokenizer_files
    from megacore.tokenizers import build_tokenizer

    data = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "data")
    config = {"data": {"tokenizer_type": "GPT2BPETokenizer",
                       "vocab_file": os.path.abspath(os.path.join(data, "vocab.json")),
                       "merge_file": os.path.abspath(os.path.join(data, "merges.txt"))}}
    out = tmp_path / "hf"
    out.mkdir()
    assert exported_tokenizer_files(config, str(tmp_path), str(out)) == ["vocab.json",
                                                                         "merges.txt"]
    hf = transformers.GPT2TokenizerFast.from_pretrained(out)
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=config["data"]["vocab_file"],
                           merge_file=config["data"]["merge_file"])
    text = "def parse(self, text):\n    return text.split()"
    assert hf(text)["input_ids"] == ours.tokenize(text)
    config["data"]["merge_file"] = "missing/merges.txt"
    with pytest.raises(ConversionError, match="merge_file 'missing/merges.txt' was not found"):
        exported_tokenizer_files(config, str(tmp_path), str(out))


def test_pretrain_resumes_a_converted_mistral_and_its_loss_is_transformers(tmp_path):
    """``pretrain_gpt.py --load`` of a converted Mistral (window 4, sequences of 16) at
    tp 2 takes model flags and tokenizer from the checkpoint; its first training loss is
    ``transformers``' cross entropy on the same batch (the sliding window is in the
    training forward)."""
    import shlex

    from megacore.training.arguments import parse_args
    from megacore.training.training import _num_samples, saved_run_config
    from tests.training.test_pretrain_gpt import _example, _run_pretrain

    hf_dir, mc_dir, log = str(tmp_path / "hf"), str(tmp_path / "mc"), tmp_path / "log.jsonl"
    model = _save_hf("mistral", hf_dir)
    convert_checkpoint(load_dir=hf_dir, save_dir=mc_dir, saver="megacore", progress=False)
    argv = shlex.split(f"--load {mc_dir} --no-load-optim --no-load-rng --mock-data "
                       "--seq-length 16 --micro-batch-size 2 --global-batch-size 2 "
                       "--train-iters 1 --lr 1e-3 --eval-iters 0 --hidden-dropout 0 "
                       "--attention-dropout 0 --log-interval 1")
    run_distributed(_run_pretrain, 2, args=(argv + ["--tensor-model-parallel-size", "2",
                                                    "--log-jsonl", str(log)],), timeout=240)
    loss = [r for r in map(json.loads, open(log)) if "lm_loss" in r][0]["lm_loss"]

    run = parse_args(argv, world_size=1, checkpoint_config=saved_run_config(mc_dir))
    assert run.model.window_size == (3, 0) and run.data.tokenizer_type == "HuggingFaceTokenizer"
    train_ds = _example().train_valid_test_datasets_provider(run, _num_samples(run, 0))[0]
    batch = [train_ds[i] for i in range(2)]
    tokens = torch.stack([torch.as_tensor(b["tokens"]) for b in batch])
    labels = torch.stack([torch.as_tensor(b["labels"]) for b in batch])
    mask = torch.stack([torch.as_tensor(b["loss_mask"]) for b in batch]).float()
    per_token = torch.nn.functional.cross_entropy(
        _hf_logits(model, tokens).transpose(1, 2), labels, reduction="none")
    want = (per_token * mask).sum() / mask.sum()
    assert tokens.size(1) == 16 > 4
    torch.testing.assert_close(torch.tensor(loss), want, rtol=1e-5, atol=1e-6)
