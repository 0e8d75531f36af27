"""Tiny GPT models for the converter tests: built from a :class:`GPTDescription`, stepped
once (so the optimizer state is not zero), saved with ``save_checkpoint``, and run
through a hand-rolled pipeline forward that returns full fp32 logits on every layout.

Kinds: ``gpt`` (LayerNorm, learned positions, biases, tied embeddings, multi-head),
``llama`` (RMSNorm, RoPE, SwiGLU, GQA with one key/value group, so tp > 1 replicates k/v
rows; untied), ``moe`` (Llama-style attention with two groups, 4 routed experts, tied),
``deepseek`` (multi-latent attention, first layer dense, sigmoid routing with expert bias,
2 expert groups, a scaling factor and a shared expert; untied), ``deepseek_mtp`` (the same
with one multi-token-prediction depth).
Vocabulary 61 is padded differently at tp = 1, 2, 4.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megacore import parallel_state as ps
from megacore.checkpointing import load_checkpoint, save_checkpoint
from megacore.checkpointing.conversion import GPTDescription, MegacoreLayout
from megacore.models.gpt import GPTModel, get_gpt_decoder_block_spec
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from tests.checkpointing import toy_model as toy

VOCAB = 61
SEQ, BATCH = 8, 2


def description(kind: str) -> GPTDescription:
    common = dict(num_layers=4, hidden_size=16, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=SEQ)
    if kind == "gpt":
        return GPTDescription(ffn_hidden_size=32, activation="gelu_tanh", **common)
    llama = dict(normalization="RMSNorm", position_embedding_type="rope",
                 add_bias_linear=False, gated_linear_unit=True, activation="silu",
                 ffn_hidden_size=24, **common)
    if kind == "llama":
        return GPTDescription(num_query_groups=1, share_embeddings_and_output_weights=False,
                              **llama)
    if kind == "deepseek_mtp":
        return dataclasses.replace(description("deepseek"), mtp_num_layers=1)
    if kind == "deepseek":
        return GPTDescription(
            share_embeddings_and_output_weights=False, multi_latent_attention=True,
            q_lora_rank=12, kv_lora_rank=8, qk_head_dim=4, qk_pos_emb_head_dim=4,
            v_head_dim=6, rotary_interleaved=True, num_moe_experts=4, moe_ffn_hidden_size=8,
            moe_router_topk=2, moe_layer_freq=[0, 1, 1, 1], moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True, moe_router_num_groups=2,
            moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5,
            moe_shared_expert_intermediate_size=8, **llama)
    return GPTDescription(num_query_groups=2, num_moe_experts=4, moe_router_topk=2, **llama)


def build_model(desc: GPTDescription, tp: int, pp: int, ep: int = 1, seed: int = 1234):
    """This rank's model chunk (initializes the parallel grid)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    kw = desc.transformer_config_kwargs()
    kw.update(hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
              pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
    config = TransformerConfig(**kw)
    model_parallel_manual_seed(seed)
    return GPTModel(config, get_gpt_decoder_block_spec(config),
                    pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage(), parallel_output=False,
                    **desc.gpt_model_kwargs())


def config_dict(desc: GPTDescription, tp: int, pp: int, ep: int) -> dict:
    return desc.to_config_dict(MegacoreLayout(tp=tp, pp=pp, ep=ep).config_fields())


def save_stepped(root: str, kind: str, tp: int, pp: int, ep: int, formats=("torch",)):
    """Build, take one optimizer step, save in each format under ``root/<format>``.

    Returns the saved model's own logits (:func:`pipeline_logits` of :func:`tokens`) on
    the rank that holds them, else None: the reference a converted checkpoint must give.
    """
    desc = description(kind)
    model = build_model(desc, tp, pp, ep)
    opt, sched = toy.build_optimizer([model])
    toy.fake_step([model], opt, sched)
    for fmt in formats:
        save_checkpoint(5, [model], opt, sched, save_dir=f"{root}/{fmt}", ckpt_format=fmt,
                        consumed_train_samples=40, config_dict=config_dict(desc, tp, pp, ep))
    logits = pipeline_logits(model, tokens())
    first_of_stage = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    return logits if logits is not None and first_of_stage else None


def tokens(seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def pipeline_logits(model, input_ids: torch.Tensor):
    """Full logits ``[b, s, V]`` on the last stage (None elsewhere): stages pass hidden
    states ``[s, b, h]`` along the pipeline with send/recv."""
    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    h = model.config.hidden_size
    with torch.no_grad():
        if rank > 0:
            hidden = torch.empty(SEQ, BATCH, h)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(input_ids, positions, None)
        if rank < pp - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    return out.float()


def load_and_logits(load_dir: str, kind: str, layouts, no_load_optim: bool = False):
    """For each (tp, pp, ep) in ``layouts`` (each filling the world): load the checkpoint
    ``load_dir[layout]`` and return the logits (on the last pipeline stage, tp/dp rank 0)."""
    desc = description(kind)
    out = []
    for layout in layouts:
        tp, pp, ep = layout
        model = build_model(desc, tp, pp, ep, seed=99)
        opt, sched = toy.build_optimizer([model])
        load_checkpoint([model], opt, sched, load_dir=load_dir[layout], no_load_rng=True,
                        no_load_optim=no_load_optim)
        logits = pipeline_logits(model, tokens())
        first_of_stage = ps.get_tensor_model_parallel_rank() == 0 and \
            ps.get_data_parallel_rank() == 0
        out.append(logits if logits is not None and first_of_stage else None)
    return out
