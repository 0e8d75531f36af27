"""GPTModel at tp=2 and tp=4 (sequence parallel on and off) equals the single-process model.

One reference run (1 rank) and one run per tp size (2 and 4 ranks) each evaluate every
case; the parent compares logits, per-token loss and every gathered gradient. Cases
cover the GPT spec (LayerNorm, GeLU, biases, learned positions) and the Llama-style spec
(RMSNorm, SwiGLU, RoPE, GQA, no biases), a vocabulary not divisible by tp (padded),
fewer key/value groups than tp ranks (replicated key/value heads), tied and untied output
layers, gathered (``parallel_output=False``) logits, qk-layernorm, and dropout on
(masks are layout-independent by construction; attention dropout through the opt-in
``layout_independent_attention_dropout``).

Tolerance: fp32, rtol 1e-5 / atol 1e-5 on logits and loss (values ~1-5) and atol 1e-6 on
gradients (values ~1e-3): sharded matmuls and all-reduces sum in a different order than
one matmul; observed differences are ~1e-7 and ~1e-9.
"""

import pytest
import torch
import torch.distributed as dist

from megacore import device
from megacore import parallel_state as ps
from megacore.models.gpt import (
    get_gpt_decoder_block_spec,
    GPTModel,
    get_gpt_layer_local_spec,
    get_llama_layer_local_spec,
    llama_config_kwargs,
)
from megacore.tensor_parallel import all_gather_along_dim, model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from megacore.transformer.qkv_layout import collapse_qkv_rows, expand_qkv_rows
from tests.multirank import run_distributed

FWD_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)
MLA = dict(multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8,
           qk_pos_emb_head_dim=4, v_head_dim=6)
VOCAB, SEQ, BATCH = 51, 8, 2  # 51 is divisible by neither 2 nor 4: padded to 52

CASES = {
    "gpt": dict(spec="gpt", cfg={}),
    "gpt_tied": dict(spec="gpt", cfg={}, model=dict(share_embeddings_and_output_weights=True)),
    # Attention dropout compares across layouts with the opt-in keyed (layout-independent)
    # mask; the default in-kernel dropout agrees only statistically.
    "gpt_dropout": dict(spec="gpt", cfg=dict(hidden_dropout=0.1, attention_dropout=0.2,
                                             layout_independent_attention_dropout=True)),
    "gpt_gathered_output": dict(spec="gpt", cfg={}, model=dict(parallel_output=False)),
    "llama_gqa2": dict(spec="llama", cfg=llama_config_kwargs(num_query_groups=2),
                       model=dict(position_embedding_type="rope")),
    # Multi-latent attention (DeepSeek-V3 shape): replicated down-projections and latent
    # norms, column-parallel up-projections; with and without the query latent.
    "mla": dict(spec="mla", cfg=dict(**llama_config_kwargs(), **MLA, rotary_interleaved=True),
                model=dict(position_embedding_type="rope")),
    "mla_no_q_lora": dict(spec="mla", cfg=dict(**llama_config_kwargs(),
                                               **{**MLA, "q_lora_rank": None}),
                          model=dict(position_embedding_type="rope")),
    "llama_mqa_qknorm_tied": dict(
        spec="llama", qk_layernorm=True, cfg=llama_config_kwargs(num_query_groups=1),
        model=dict(position_embedding_type="rope", rotary_percent=0.5,
                   share_embeddings_and_output_weights=True)),
    # Mistral/Qwen2/Llama-3.1 features: sliding window (3, 0) < SEQ, q/k/v bias, RoPE
    # scaling; once with SDPA and once with attention dropout (the explicit kernel, via
    # the opt-in layout-independent mask so layouts agree exactly).
    "llama_window_qkvbias_ropescale": dict(
        spec="llama", cfg=dict(llama_config_kwargs(num_query_groups=2), window_size=(3, 0),
                               add_qkv_bias=True),
        model=dict(position_embedding_type="rope", rope_scaling=True,
                   rope_scaling_original_max_position_embeddings=8)),
    "llama_window_dropout": dict(
        spec="llama", cfg=dict(llama_config_kwargs(num_query_groups=2), window_size=(3, 0),
                               attention_dropout=0.2,
                               layout_independent_attention_dropout=True),
        model=dict(position_embedding_type="rope")),
}


def _build(case, tp, sequence_parallel, **cfg_overrides):
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
               hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
               sequence_parallel=sequence_parallel)
    cfg.update(case["cfg"])
    cfg.update(cfg_overrides)
    config = TransformerConfig(**cfg)
    if case["spec"] == "mla":
        spec = get_gpt_decoder_block_spec(config)
    elif case["spec"] == "gpt":
        spec = get_gpt_layer_local_spec(qk_layernorm=case.get("qk_layernorm", False))
    else:
        spec = get_llama_layer_local_spec(qk_layernorm=case.get("qk_layernorm", False))
    model_parallel_manual_seed(1234)
    return GPTModel(config, spec, VOCAB, max_sequence_length=16, **case.get("model", {}))


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    dev = device.current_device()
    return ids.to(dev), torch.arange(SEQ, device=dev).expand(BATCH, SEQ), labels.to(dev)


def _unshard(param, tensor, group):
    """This rank's shard -> the full tensor in the tp=1 layout (stride-aware)."""
    world = dist.get_world_size(group)
    if not getattr(param, "tensor_model_parallel", False) or world == 1:
        return tensor
    dim, stride = param.partition_dim, param.partition_stride
    shards = all_gather_along_dim(tensor.contiguous(), dim, group).chunk(world, dim=dim)
    # Rank r holds master blocks r, r + world, ... (see _shard_master_weight).
    blocks = [shards[r].chunk(stride, dim=dim)[k] for k in range(stride) for r in range(world)]
    return torch.cat(blocks, dim=dim)


def _logical(name, full, config, vocab):
    """tp layout -> the single-process layout (collapse replicated k/v, drop vocab pad)."""
    tp = config.tensor_model_parallel_size
    layout = dict(num_attention_heads=config.num_attention_heads,
                  num_query_groups=config.num_query_groups, kv_channels=config.kv_channels,
                  tp_size=tp)
    if "linear_qkv" in name:
        collapsed = collapse_qkv_rows(full, **layout)
        # Every replica of a key/value head must hold the same (full) value.
        torch.testing.assert_close(expand_qkv_rows(collapsed, **layout), full, rtol=0, atol=0)
        return collapsed
    if "word_embeddings" in name or "output_layer" in name:
        return full[:vocab]
    return full


def _gathered_grads(model, group):
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad
        if getattr(p, "sequence_parallel", False):
            grad = grad.clone()
            dist.all_reduce(grad, group=group)  # what finalize_model_grads does under SP
        grads[name] = _logical(name, _unshard(p, grad, group), model.config, VOCAB)
    return grads


def _gathered_weights(model, group):
    return {name: _logical(name, _unshard(p, p.detach(), group), model.config, VOCAB)
            for name, p in model.named_parameters()}


def _run_case(case, tp, sequence_parallel):
    model = _build(case, tp, sequence_parallel)
    group = ps.get_tensor_model_parallel_group()
    ids, pos, labels = _batch()
    model_parallel_manual_seed(99)  # dropout stream, same on every layout
    logits = model(ids, pos, None).detach()  # [b, s, V/tp] (or [b, s, V] gathered)
    if model.parallel_output:
        logits = all_gather_along_dim(logits, 2, group)[..., :VOCAB]
    model_parallel_manual_seed(99)
    loss = model(ids, pos, None, labels=labels)  # [b, s]
    loss.mean().backward()
    to_cpu = lambda d: {k: v.cpu() for k, v in d.items()}  # noqa: E731
    return dict(logits=logits.cpu(), loss=loss.detach().cpu(),
                grads=to_cpu(_gathered_grads(model, group)),
                weights=to_cpu(_gathered_weights(model, group)))


def _run_all(tp, sp_modes):
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    out = {}
    for name, case in CASES.items():
        for sp in sp_modes:
            out[(name, sp)] = _run_case(case, tp, sp)
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_run_all, 1, args=(1, (False,)))[0]


def _compare(ref, got, what):
    torch.testing.assert_close(got["logits"], ref["logits"], **FWD_TOL, msg=f"{what} logits")
    torch.testing.assert_close(got["loss"], ref["loss"], **FWD_TOL, msg=f"{what} loss")
    assert got["grads"].keys() == ref["grads"].keys(), what
    for name in ref["grads"]:
        torch.testing.assert_close(got["weights"][name], ref["weights"][name], rtol=0, atol=0,
                                   msg=f"{what} init of {name}")
        torch.testing.assert_close(got["grads"][name], ref["grads"][name], **GRAD_TOL,
                                   msg=f"{what} grad of {name}")


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_gpt_matches_single_process(reference, tp):
    results = run_distributed(_run_all, tp, args=(tp, (False, True)), timeout=240)[0]
    for (name, sp), got in results.items():
        _compare(reference[(name, False)], got, f"tp={tp} sp={sp} {name}")


def test_reference_is_not_trivial(reference):
    # Guards the comparisons above: dropout changes the loss, grads reach every param.
    assert not torch.allclose(reference[("gpt", False)]["loss"],
                              reference[("gpt_dropout", False)]["loss"])
    for result in reference.values():
        for name, grad in result["grads"].items():
            assert grad.abs().sum() > 0, name
