"""DeepSeek-V3 and Qwen3-MoE through the converter, against ``transformers`` itself.

For each family a tiny random model (2 layers, hidden 32, 4 routed experts, top-2,
vocabulary 61, seeded, no hub; HF init std 0.3, norms, biases and DeepSeek's
``e_score_correction_bias`` perturbed so that every tensor matters) and a tiny word-level
tokenizer are saved with ``save_pretrained``, then:

* imported (``--loader hf``) at tp 1, at tp 2 x ep 2 (experts split over ep, each expert
  over expert-tp 2) and at pp 2 x ep 2 (the dense layer on stage 0), on 4 ranks:
  megacore's fp32 logits equal ``transformers``' within atol 2e-5 / rtol 1e-4 (other op orders: the MoE's token permutation and the
  renormalized top-k computed as a softmax over the chosen logits);
* served from the tp 1 checkpoint with ``--load`` alone (MLA widths, routing settings,
  the dense-layer pattern and the tokenizer all come from the checkpoint) through the
  HTTP server (``PUT /api`` and ``POST /v1/chat/completions``, greedy): tokens and text
  equal ``transformers``' ``generate``;
* exported back (``--saver hf``) from the tp 2 x ep 2 checkpoint: safetensors bitwise
  equal to the source and ``from_pretrained`` gives exactly the source's logits.

Also: DeepSeek without a query latent, with RoPE over halves and one expert group;
DeepSeek with YaRN rope scaling (tp 1 and tp 2 x ep 2 logits, bitwise export); a
stepped DeepSeek-style megacore checkpoint changing layout with its optimizer state;
``pretrain_gpt.py --load`` of a converted DeepSeek-V3 at ep 2 (first loss =
``transformers``'); configs and weights that cannot be reproduced refused by name.

DeepSeek-V3: q and kv latents (``q_lora_rank`` 16, ``kv_lora_rank`` 16), interleaved
RoPE, the first layer dense (``first_k_dense_replace`` 1), 2 groups with 1 kept
(``n_group`` 2, ``topk_group`` 1), ``routed_scaling_factor`` 2.5, one shared expert.
Qwen3-MoE: per-head q/k norms, head dim 16, layer 0 dense (``mlp_only_layers``), once
with ``norm_topk_prob`` (megacore's default top-k softmax) and once without
(``moe_router_pre_softmax``).
"""

import json
import os

import pytest
import torch

from megacore.checkpointing.conversion import (
    ConversionError,
    GPTDescription,
    convert_checkpoint,
    description_from_hf_config,
    hf_config_from_description,
)
from tests.checkpointing.conversion import fixtures as fx
from tests.checkpointing.conversion.test_hf_families import (
    TOL,
    _desc_dict,
    _hf_chat,
    _hf_greedy,
    _hf_logits,
    _safetensors,
    _serve_greedy,
    _tokenizer,
)
from tests.multirank import run_distributed

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

COMMON = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
              moe_intermediate_size=16, num_experts_per_tok=2, vocab_size=fx.VOCAB,
              max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.3,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _hf_model(kind, mtp=0):
    """``mtp``: ``num_nextn_predict_layers`` in the config (transformers' default is 1, but
    ``save_pretrained`` writes no such layer: :func:`_add_mtp_weights` does)."""
    torch.manual_seed(0)
    if kind == "deepseek_v3":
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, n_group=2,
            topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            rope_interleave=True, num_nextn_predict_layers=mtp, **COMMON))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            num_key_value_heads=2, head_dim=16, num_experts=4, mlp_only_layers=[0],
            norm_topk_prob=kind == "qwen3_moe", **COMMON))
    with torch.no_grad():  # HF's init leaves norms at 1 and the expert bias at 0
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    return model.eval()


def _layout_logits(ckpts, desc_dict):
    """Rank body (world 4): logits of each ``(tp, pp, ep) -> checkpoint`` layout (None
    off the last pipeline stage)."""
    from megacore.checkpointing import load_checkpoint

    desc, out = GPTDescription(**desc_dict), []
    for (tp, pp, ep), load_dir in ckpts:
        model = fx.build_model(desc, tp, pp, ep, seed=5)
        load_checkpoint([model], None, None, load_dir=load_dir, no_load_rng=True,
                        no_load_optim=True)
        out.append(fx.pipeline_logits(model, fx.tokens()))
    return out


def _import_in_three_layouts(hf_dir, tmp_path):
    """``[((tp, pp, ep), directory)]``: tp 1 (torch), tp 2 x ep 2 (torch_dist), pp 2 x ep 2
    (torch), each converted from ``hf_dir``."""
    ckpts = [((1, 1, 1), str(tmp_path / "tp1")), ((2, 1, 2), str(tmp_path / "tp2ep2")),
             ((1, 2, 2), str(tmp_path / "pp2ep2"))]
    for ((tp, pp, ep), directory), fmt in zip(ckpts, ("torch", "torch_dist", "torch")):
        convert_checkpoint(load_dir=hf_dir, save_dir=directory, saver="megacore",
                           ckpt_format=fmt, target_tensor_parallel_size=tp,
                           target_pipeline_parallel_size=pp, target_expert_parallel_size=ep,
                           progress=False)
    return ckpts


KINDS = ["deepseek_v3", "qwen3_moe", "qwen3_moe_unnormalized"]


@pytest.mark.parametrize("kind", KINDS)
def test_moe_family_imports_serves_and_exports_like_transformers(tmp_path, kind):
    hf_dir = str(tmp_path / "hf")
    model = _hf_model(kind)
    model.save_pretrained(hf_dir)
    _tokenizer().save_pretrained(hf_dir)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    reference = _hf_logits(model, fx.tokens())

    desc = _desc_dict(hf_dir)
    assert desc["moe_layer_freq"] == [0, 1]  # the dense first layer
    if kind == "deepseek_v3":
        assert desc["moe_router_num_groups"] == 2 and desc["moe_router_group_topk"] == 1
        assert desc["moe_shared_expert_intermediate_size"] == 16
    else:
        assert desc["moe_router_pre_softmax"] == (kind != "qwen3_moe")

    ckpts = _import_in_three_layouts(hf_dir, tmp_path)
    per_rank = run_distributed(_layout_logits, 4, args=(ckpts, desc), timeout=240)
    for index, ((_, pp, _), _) in enumerate(ckpts):
        logits = [r[index] for r in per_rank if r[index] is not None]
        assert len(logits) == 4 // pp  # every rank of the last stage
        for each in logits:
            torch.testing.assert_close(each, reference, **TOL)

    tokens, text, reply, _ = run_distributed(_serve_greedy, 1, args=(ckpts[0][1],))[0]
    want_tokens, want_text = _hf_greedy(model, tokenizer)
    assert tokens == want_tokens
    assert text == want_text
    assert reply == _hf_chat(model, tokenizer) and reply

    back = tmp_path / "hf_back"
    convert_checkpoint(load_dir=ckpts[1][1], save_dir=str(back), saver="hf",
                       max_shard_size=16384, progress=False)
    assert json.load(open(back / "config.json"))["architectures"] == \
        json.load(open(os.path.join(hf_dir, "config.json")))["architectures"]
    _assert_exported_bitwise(model, hf_dir, back, reference)


def _assert_exported_bitwise(model, hf_dir, back, reference):
    """The export's safetensors equal the source's, and reload to the same logits."""
    original = safetensors_torch.load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = _safetensors(back)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    reloaded = type(model).from_pretrained(back).eval()
    torch.testing.assert_close(_hf_logits(reloaded, fx.tokens()), reference, rtol=0, atol=0)


def _deepseek_config(**overrides):
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
           "moe_intermediate_size": 16, "vocab_size": 61, "n_routed_experts": 8,
           "num_experts_per_tok": 2, "n_group": 4, "topk_group": 1, "kv_lora_rank": 16,
           "q_lora_rank": None, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
    cfg.update(overrides)
    return cfg


def test_configs_the_converter_cannot_reproduce_are_refused_by_name(tmp_path):
    desc = description_from_hf_config(_deepseek_config(first_k_dense_replace=5))
    assert desc.q_lora_rank is None and desc.moe_layer_freq == [0, 0]
    with pytest.raises(ConversionError, match=r"best 2 experts, megacore by its best "
                                              r"topk // group_topk = 4 // 1"):
        description_from_hf_config(_deepseek_config(num_experts_per_tok=4))
    # Every group kept: no group limit, whatever topk is.
    assert description_from_hf_config(_deepseek_config(
        num_experts_per_tok=3, topk_group=4)).moe_router_num_groups is None
    with pytest.raises(ConversionError, match="norm_topk_prob False with "
                                              "num_experts_per_tok 2"):
        description_from_hf_config(_deepseek_config(norm_topk_prob=False))
    with pytest.raises(ConversionError, match="config.json scoring_func 'softmax'"):
        description_from_hf_config(_deepseek_config(scoring_func="softmax"))
    with pytest.raises(ConversionError, match="num_key_value_heads 2"):
        description_from_hf_config(_deepseek_config(num_key_value_heads=2))
    with pytest.raises(ConversionError, match="lacks 'kv_lora_rank'"):
        description_from_hf_config(_deepseek_config(kv_lora_rank=None))

    # Export: what each architecture's router and layers cannot hold.
    desc = description_from_hf_config(_deepseek_config())
    with pytest.raises(ConversionError, match="Qwen3MoeForCausalLM cannot represent this "
                                              "model: has no multi-latent attention"):
        hf_config_from_description(desc, "Qwen3MoeForCausalLM")
    desc.moe_layer_freq = [1, 0]
    with pytest.raises(ConversionError, match=r"dense layers must be the first ones "
                                              r"\(first_k_dense_replace\)"):
        hf_config_from_description(desc, "DeepseekV3ForCausalLM")
    qwen = description_from_hf_config(dict(_deepseek_config(), architectures=[
        "Qwen3MoeForCausalLM"], num_experts=4, num_key_value_heads=2))
    assert qwen.qk_layernorm and not qwen.multi_latent_attention
    qwen.moe_router_score_function = "sigmoid"
    with pytest.raises(ConversionError, match="routes by a plain top-k softmax"):
        hf_config_from_description(qwen, "Qwen3MoeForCausalLM")


def test_deepseek_multi_token_prediction_weights_are_refused(tmp_path):
    """A released DeepSeek-V3 keeps its MTP module as layer ``num_hidden_layers``."""
    hf_dir = str(tmp_path / "hf")
    _hf_model("deepseek_v3").save_pretrained(hf_dir)
    weights = safetensors_torch.load_file(os.path.join(hf_dir, "model.safetensors"))
    weights["model.layers.2.eh_proj.weight"] = torch.zeros(32, 64)
    safetensors_torch.save_file(weights, os.path.join(hf_dir, "model.safetensors"),
                                metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"weights of layers \[2\] beyond "
                                              r"num_hidden_layers 2 \+ num_nextn_predict_"
                                              r"layers 0: set num_nextn_predict_layers"):
        convert_checkpoint(load_dir=hf_dir, save_dir=str(tmp_path / "mc"), saver="megacore",
                           progress=False)


def _add_mtp_weights(hf_dir):
    """Append one multi-token-prediction depth as DeepSeek-V3 stores it: layer
    ``num_hidden_layers`` with ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, a
    decoder layer (a perturbed copy of the MoE layer 1) and copies of the embedding and
    ``lm_head`` (``embed_tokens``, ``shared_head.head``)."""
    path = os.path.join(hf_dir, "model.safetensors")
    weights = safetensors_torch.load_file(path)
    gen = torch.Generator().manual_seed(3)
    mtp, h = f"model.layers.{COMMON['num_hidden_layers']}.", COMMON["hidden_size"]
    for name in [k for k in weights if k.startswith("model.layers.1.")]:
        tensor = weights[name]
        weights[name.replace("model.layers.1.", mtp)] = \
            tensor + 0.1 * torch.randn(tensor.shape, generator=gen)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        weights[f"{mtp}{norm}.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
    weights[f"{mtp}eh_proj.weight"] = 0.3 * torch.randn(h, 2 * h, generator=gen)
    weights[f"{mtp}embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    weights[f"{mtp}shared_head.head.weight"] = weights["lm_head.weight"].clone()
    safetensors_torch.save_file(weights, path, metadata={"format": "pt"})
    return weights


def _hf_mtp_loss(model, hf_dir, weights, tokens, labels):
    """Depth 1's loss from transformers' own modules (``DeepseekV3DecoderLayer``, its
    RMSNorm and rotary embedding) wired as DeepSeek-V3 / vLLM's ``deepseek_mtp``:
    ``eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])`` -> layer -> ``shared_head``; the
    last position (no shifted label) is masked. The decoder layer is loaded by
    transformers itself (a copy of the checkpoint read with one more hidden layer)."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

    cfg, n = model.config, COMMON["num_hidden_layers"]
    prefix = f"model.layers.{n}."
    mine = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    longer = os.path.join(os.path.dirname(hf_dir), "hf_with_mtp_layer")
    transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **dict(cfg.to_dict(), num_hidden_layers=n + 1))).save_pretrained(longer)
    safetensors_torch.save_file(weights, os.path.join(longer, "model.safetensors"),
                                metadata={"format": "pt"})
    layer = transformers.DeepseekV3ForCausalLM.from_pretrained(longer).model.layers[n].eval()
    norms = {}
    for name in ("enorm", "hnorm", "shared_head.norm"):
        norms[name] = ds.DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        norms[name].weight.data.copy_(mine[f"{name}.weight"])
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    shifted = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    with torch.no_grad():
        hidden = model.model(tokens).last_hidden_state  # after the final norm
        x = torch.cat([norms["enorm"](model.model.embed_tokens(shifted)),
                       norms["hnorm"](hidden)], dim=-1) @ mine["eh_proj.weight"].t()
        x = layer(x, attention_mask=None, position_ids=positions,
                  position_embeddings=model.model.rotary_emb(x, positions))
        x = x[0] if isinstance(x, tuple) else x
        logits = norms["shared_head.norm"](x) @ mine["shared_head.head.weight"].t()
    target = torch.cat([labels[:, 1:], torch.zeros_like(labels[:, :1])], dim=1)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target,
                                                  reduction="none")
    return per_token[:, :-1].mean()


def _layout_mtp_losses(ckpts, desc_dict, labels):
    """Rank body (world 4): each layout's logits and MTP depth losses (last stage)."""
    from megacore import parallel_state as ps
    from megacore.checkpointing import load_checkpoint

    desc, out = GPTDescription(**desc_dict), []
    for (tp, pp, ep), load_dir in ckpts:
        model = fx.build_model(desc, tp, pp, ep, seed=5)
        assert (model.mtp is not None) == ps.is_pipeline_last_stage()
        load_checkpoint([model], None, None, load_dir=load_dir, no_load_rng=True,
                        no_load_optim=True)
        logits = fx.pipeline_logits(model, fx.tokens())
        if pp > 1:  # the MTP stage's embedding copy was loaded from the one checkpoint table
            table = model.embedding.word_embeddings.weight
            whole = torch.empty((table.shape[0] * tp,) + tuple(table.shape[1:]))
            torch.distributed.all_gather_into_tensor(whole, table.detach().contiguous(),
                                                     group=ps.get_tensor_model_parallel_group())
            out.append(("table", whole[:desc.vocab_size]))
        out.append((logits, _mtp_losses(model, labels, pp)))
    return out


def _mtp_losses(model, labels, pp):
    """The MTP depths' losses of one pipelined forward with labels (None off the last stage)."""
    from megacore import parallel_state as ps

    rank, positions = ps.get_pipeline_model_parallel_rank(), None
    with torch.no_grad():
        if rank > 0:
            hidden = torch.empty(fx.SEQ, fx.BATCH, model.config.hidden_size)
            torch.distributed.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(fx.tokens(), positions, None, labels=labels if rank == pp - 1 else None)
        if rank < pp - 1:
            torch.distributed.send(out.contiguous(),
                                   dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    return [float(v) for v in model.mtp.last_losses]


def test_deepseek_multi_token_prediction_round_trips_and_matches_transformers(tmp_path):
    """A DeepSeek-V3 checkpoint with one MTP depth (``num_nextn_predict_layers`` 1):
    imported at tp 1, tp 2 x ep 2 (torch_dist) and pp 2 x ep 2 (the depth and a copy of
    the embedding on the last stage), the main logits equal transformers' (which ignores
    the MTP weights) and the depth's loss equals the one computed from transformers'
    modules; exported back from each, the safetensors (MTP tensors included) are bitwise
    the source's."""
    hf_dir = str(tmp_path / "hf")
    _hf_model("deepseek_v3", mtp=1).save_pretrained(hf_dir)
    weights = _add_mtp_weights(hf_dir)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir).eval()
    reference = _hf_logits(model, fx.tokens())
    labels = torch.randint(0, fx.VOCAB, fx.tokens().shape, generator=torch.Generator()
                           .manual_seed(11))
    want_mtp = float(_hf_mtp_loss(model, hf_dir, weights, fx.tokens(), labels))
    desc = _desc_dict(hf_dir)
    assert desc["mtp_num_layers"] == 1

    ckpts = _import_in_three_layouts(hf_dir, tmp_path)
    per_rank = run_distributed(_layout_mtp_losses, 4, args=(ckpts, desc, labels), timeout=240)
    results = [item for r in per_rank for item in r if item[0] is not None]
    tables = [t for kind, t in results if isinstance(kind, str)]
    assert len(tables) == 4  # every rank of the pp 2 x ep 2 layout
    for table in tables:
        assert torch.equal(table, weights["model.embed_tokens.weight"])
    found = [(logits, mtp) for logits, mtp in results if not isinstance(logits, str)]
    assert len(found) == 4 + 4 + 2  # the last stage's ranks of each layout
    for logits, mtp in found:
        torch.testing.assert_close(logits, reference, **TOL)
        assert len(mtp) == 1
        # fp32, other op orders (MoE permutation, MLA): as the logits' tolerance.
        torch.testing.assert_close(torch.tensor(mtp[0]), torch.tensor(want_mtp), **TOL)

    original = safetensors_torch.load_file(os.path.join(hf_dir, "model.safetensors"))
    assert any(k.startswith("model.layers.2.shared_head") for k in original)
    for _, directory in ckpts:
        back = tmp_path / f"back_{os.path.basename(directory)}"
        convert_checkpoint(load_dir=directory, save_dir=str(back), saver="hf", progress=False)
        assert json.load(open(back / "config.json"))["num_nextn_predict_layers"] == 1
        exported = _safetensors(back)
        assert sorted(original) == sorted(exported)
        assert all(torch.equal(original[k], exported[k]) for k in original)


def test_deepseek_multi_token_prediction_inconsistent_checkpoints(tmp_path):
    """transformers' default config (num_nextn_predict_layers 1) without MTP weights
    converts without MTP (noted); an MTP embedding copy that differs from the model's, or
    a depth missing a tensor, is refused by name."""
    hf_dir = str(tmp_path / "hf")
    _hf_model("deepseek_v3", mtp=1).save_pretrained(hf_dir)
    report = convert_checkpoint(load_dir=hf_dir, save_dir=str(tmp_path / "plain"),
                                saver="megacore", progress=False)
    assert any("num_nextn_predict_layers 1" in note for note in report.notes)
    weights = _add_mtp_weights(hf_dir)
    path = os.path.join(hf_dir, "model.safetensors")
    weights["model.layers.2.embed_tokens.weight"] += 1.0
    safetensors_torch.save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.embed_tokens\.weight "
                                              r"differs from model\.embed_tokens\.weight"):
        convert_checkpoint(load_dir=hf_dir, save_dir=str(tmp_path / "a"), saver="megacore",
                           progress=False)
    del weights["model.layers.2.eh_proj.weight"]
    safetensors_torch.save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"needs \['model\.layers\.2\.eh_proj"):
        convert_checkpoint(load_dir=hf_dir, save_dir=str(tmp_path / "b"), saver="megacore",
                           progress=False)


def test_deepseek_without_query_latent_nor_interleave_nor_groups(tmp_path):
    """``q_lora_rank`` None (``q_proj``, as DeepSeek-V2-Lite), RoPE over halves
    (``rope_interleave`` false) and one expert group: tp 2 x ep 2 logits equal
    transformers', and the export is bitwise."""
    torch.manual_seed(1)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        num_key_value_heads=4, n_routed_experts=4, n_shared_experts=2, n_group=1,
        topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, rope_interleave=False,
        num_nextn_predict_layers=0, **COMMON)).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    hf_dir, mc_dir, back = (str(tmp_path / n) for n in ("hf", "mc", "back"))
    model.save_pretrained(hf_dir)
    desc = _desc_dict(hf_dir)
    assert desc["q_lora_rank"] is None and not desc["rotary_interleaved"]
    assert desc["moe_router_num_groups"] is None and desc["moe_layer_freq"] == [1, 1]
    convert_checkpoint(load_dir=hf_dir, save_dir=mc_dir, saver="megacore",
                       target_tensor_parallel_size=2, target_expert_parallel_size=2,
                       progress=False)
    per_rank = run_distributed(_layout_logits, 4, args=([((2, 1, 2), mc_dir)], desc))
    reference = _hf_logits(model, fx.tokens())
    for logits in per_rank:
        torch.testing.assert_close(logits[0], reference, **TOL)
    convert_checkpoint(load_dir=mc_dir, save_dir=back, saver="hf", progress=False)
    original = safetensors_torch.load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = _safetensors(back)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)


# YaRN as DeepSeek-V3 configures it, shrunk: the 8 test tokens are twice the original
# context (4), base 100 with beta_fast 1 / beta_slow 0.05 ramps over the rotary pairs
# (pair 0 kept, 3 interpolated, 1-2 blended), and mscale != mscale_all_dim gives a cos/sin
# factor != 1 next to the softmax factor.
YARN = dict(rope_type="yarn", rope_theta=100.0, factor=4.0, original_max_position_embeddings=4,
            beta_fast=1.0, beta_slow=0.05, mscale=0.8, mscale_all_dim=0.6)


def test_deepseek_with_yarn_rope_scaling_imports_and_exports_like_transformers(tmp_path):
    """``rope_parameters`` of type ``yarn``: logits at tp 1 and tp 2 x ep 2 equal
    transformers', the export is bitwise with the same rope parameters."""
    torch.manual_seed(2)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True,
        rope_parameters=YARN, **dict(COMMON, max_position_embeddings=16))).eval()
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    model.save_pretrained(hf_dir)
    desc = _desc_dict(hf_dir)
    assert (desc["rope_type"], desc["rotary_scaling_factor"], desc["beta_slow"],
            desc["mscale_all_dim"]) == ("yarn", 4.0, 0.05, 0.6)
    ckpts = [((1, 1, 1), str(tmp_path / "tp1")), ((2, 1, 2), str(tmp_path / "tp2ep2"))]
    for (tp, _, ep), directory in ckpts:
        convert_checkpoint(load_dir=hf_dir, save_dir=directory, saver="megacore",
                           target_tensor_parallel_size=tp, target_expert_parallel_size=ep,
                           progress=False)
    reference = _hf_logits(model, fx.tokens())
    for per_layout in run_distributed(_layout_logits, 4, args=(ckpts, desc)):
        for logits in per_layout:
            torch.testing.assert_close(logits, reference, **TOL)
    convert_checkpoint(load_dir=ckpts[1][1], save_dir=back, saver="hf", progress=False)
    params = json.load(open(os.path.join(back, "config.json")))["rope_parameters"]
    assert params == json.load(open(os.path.join(hf_dir, "config.json")))["rope_parameters"]
    _assert_exported_bitwise(model, hf_dir, back, reference)


def test_yarn_configs_are_read_as_transformers_reads_them_or_refused():
    legacy = _deepseek_config(rope_scaling=dict(type="yarn", factor=40, mscale_all_dim=1.0,
                                                original_max_position_embeddings=4096),
                              max_position_embeddings=163840)
    desc = description_from_hf_config(legacy)
    # No mscale: transformers' plain m(factor) cos/sin factor, which mscale 0 selects.
    assert (desc.rope_type, desc.rotary_scaling_factor, desc.beta_fast, desc.mscale) == \
        ("yarn", 40.0, 32.0, 0.0)
    no_factor = dict(YARN, factor=None)
    assert description_from_hf_config(_deepseek_config(
        rope_parameters=no_factor, max_position_embeddings=32)).rotary_scaling_factor == 8.0
    for params, message in ((dict(YARN, attention_factor=1.5), "attention_factor"),
                            (dict(YARN, truncate=False), "truncate false")):
        with pytest.raises(ConversionError, match=message):
            description_from_hf_config(_deepseek_config(rope_parameters=params))
    with pytest.raises(ConversionError, match=r"'yarn' is not supported for "
                                              r"Qwen3MoeForCausalLM"):
        description_from_hf_config(dict(_deepseek_config(rope_parameters=YARN), architectures=[
            "Qwen3MoeForCausalLM"], num_experts=4, num_key_value_heads=2))


def _all_tensors(save_dir):
    """Every tensor (model and optimizer state) of a legacy checkpoint's rank files."""
    from tests.checkpointing.conversion.test_layout_conversion import _tensors

    return _tensors(save_dir)


@pytest.mark.parametrize("kind", ["deepseek", "deepseek_mtp"])
def test_deepseek_style_megacore_checkpoint_changes_layout_with_its_optimizer(tmp_path, kind):
    """A stepped DeepSeek-style model saved at tp 2 x ep 2 goes to pp 2 x ep 2 and tp 4
    and back bitwise (model and optimizer state: MLA's replicated and column-parallel
    projections, the expert bias, shared experts; with ``deepseek_mtp`` the MTP depth,
    and at pp 2 the last stage's copy of the embedding with its optimizer state); the
    pp 2 x ep 2 copy gives the source's logits."""
    src = tmp_path / "src"
    run_distributed(fx.save_stepped, 4, args=(str(src), kind, 2, 1, 2, ("torch",)))
    original = _all_tensors(src / "torch")
    assert any(".eh_proj." in k for k in original) == (kind == "deepseek_mtp")
    assert any(k.endswith("self_attention.linear_kv_down_proj.weight") for k in original)
    assert any(k.endswith("mlp.router.expert_bias") for k in original)
    dirs = {}
    for (tp, pp, ep), fmt in {(1, 2, 2): "torch", (4, 1, 1): "torch_dist"}.items():
        dirs[(tp, pp, ep)] = str(tmp_path / f"{tp}_{pp}_{ep}")
        convert_checkpoint(load_dir=str(src / "torch"), save_dir=dirs[(tp, pp, ep)],
                           ckpt_format=fmt, target_tensor_parallel_size=tp,
                           target_pipeline_parallel_size=pp, target_expert_parallel_size=ep,
                           progress=False)
        if pp == 2:  # the last stage holds an embedding exactly when it runs MTP
            last = [k for k in _all_tensors(dirs[(tp, pp, ep)]) if k.startswith("mp_rank_00_001")]
            assert any(k.endswith("model/embedding.word_embeddings.weight") for k in last) == \
                (kind == "deepseek_mtp"), last[:3]
        back = tmp_path / f"back_{tp}_{pp}_{ep}"
        convert_checkpoint(load_dir=dirs[(tp, pp, ep)], save_dir=str(back), ckpt_format="torch",
                           target_tensor_parallel_size=2, target_pipeline_parallel_size=1,
                           target_expert_parallel_size=2, progress=False)
        restored = _all_tensors(back)
        assert sorted(restored) == sorted(original)
        assert all(torch.equal(original[k], restored[k]) for k in original)
    layouts = {(2, 1, 2): str(src / "torch"), (1, 2, 2): dirs[(1, 2, 2)]}
    per_rank = run_distributed(fx.load_and_logits, 4, args=(layouts, kind, list(layouts)))
    found = [[r[i] for r in per_rank if r[i] is not None] for i in range(2)]
    assert found[0] and found[1]
    for logits in found[1]:
        torch.testing.assert_close(logits, found[0][0], rtol=1e-5, atol=1e-6)


def test_pretrain_resumes_a_converted_deepseek_at_ep2_with_transformers_loss(tmp_path):
    """``pretrain_gpt.py --load`` of a converted DeepSeek-V3 at ep 2 takes MLA widths,
    routing settings (sigmoid, expert bias, groups, scaling, shared expert), interleaved
    RoPE and the dense first layer from the checkpoint; its first training loss is
    ``transformers``' cross entropy on the same batch."""
    import shlex

    from megacore.training.arguments import parse_args
    from megacore.training.training import _num_samples, saved_run_config
    from tests.training.test_pretrain_gpt import _example, _run_pretrain

    hf_dir, mc_dir, log = str(tmp_path / "hf"), str(tmp_path / "mc"), tmp_path / "log.jsonl"
    model = _hf_model("deepseek_v3")
    model.save_pretrained(hf_dir)
    _tokenizer().save_pretrained(hf_dir)
    convert_checkpoint(load_dir=hf_dir, save_dir=mc_dir, saver="megacore", progress=False)
    argv = shlex.split(f"--load {mc_dir} --no-load-optim --no-load-rng --mock-data "
                       "--seq-length 16 --micro-batch-size 2 --global-batch-size 4 "
                       "--train-iters 1 --lr 1e-3 --eval-iters 0 --hidden-dropout 0 "
                       "--attention-dropout 0 --log-interval 1")
    run_distributed(_run_pretrain, 2, args=(argv + ["--expert-model-parallel-size", "2",
                                                    "--log-jsonl", str(log)],), timeout=240)
    loss = [r for r in map(json.loads, open(log)) if "lm_loss" in r][0]["lm_loss"]

    run = parse_args(argv, world_size=1, checkpoint_config=saved_run_config(mc_dir))
    assert run.model.multi_latent_attention and run.model.rotary_interleaved
    assert run.model.moe_router_enable_expert_bias and run.model.moe_layer_freq == [0, 1]
    train_ds = _example().train_valid_test_datasets_provider(run, _num_samples(run, 0))[0]
    batch = [train_ds[i] for i in range(4)]
    tokens = torch.stack([torch.as_tensor(b["tokens"]) for b in batch])
    labels = torch.stack([torch.as_tensor(b["labels"]) for b in batch])
    mask = torch.stack([torch.as_tensor(b["loss_mask"]) for b in batch]).float()
    per_token = torch.nn.functional.cross_entropy(
        _hf_logits(model, tokens).transpose(1, 2), labels, reduction="none")
    want = (per_token * mask).sum() / mask.sum()
    torch.testing.assert_close(torch.tensor(loss), want, rtol=1e-5, atol=1e-6)
