"""Multi-latent attention: equal to ``transformers``' DeepSeek-V3 on logits (tiny random
dense model, weights copied by name), equal to the single process at tp 2 with and
without sequence parallelism and at pp 2 (loss and every gradient), and generation from
the compressed-latent KV cache equal to recomputing the whole sequence."""

import pytest
import torch
import torch.nn.functional as F


from megacore.models.gpt import GPTModel, get_gpt_decoder_block_spec
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from tests.inference.tiny_model import destroy_single_process, init_single_process

MLA = dict(multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8,
           qk_pos_emb_head_dim=4, v_head_dim=6)
VOCAB, SEQ = 64, 12


def mla_config(**overrides):
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                  normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                  add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                  rotary_interleaved=True, layernorm_epsilon=1e-6, init_method_std=0.05,
                  **MLA)
    fields.update(overrides)
    return TransformerConfig(**fields)


def build(config, seed=5, pre_process=True, post_process=True):
    model_parallel_manual_seed(seed)
    return GPTModel(config, get_gpt_decoder_block_spec(config), vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False, pre_process=pre_process,
                    post_process=post_process)


def _hf_state(model):
    """megacore's state dict under transformers' DeepSeek-V3 names (tp 1)."""
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    out = {"model.embed_tokens.weight": sd.pop("embedding.word_embeddings.weight"),
           "model.norm.weight": sd.pop("decoder.final_layernorm.weight"),
           "lm_head.weight": sd.pop("output_layer.weight")}
    names = {"self_attention.linear_q_down_proj": "self_attn.q_a_proj",
             "self_attention.q_layernorm": "self_attn.q_a_layernorm",
             "self_attention.linear_q_up_proj": "self_attn.q_b_proj",
             "self_attention.linear_kv_down_proj": "self_attn.kv_a_proj_with_mqa",
             "self_attention.kv_layernorm": "self_attn.kv_a_layernorm",
             "self_attention.linear_kv_up_proj": "self_attn.kv_b_proj",
             "self_attention.linear_proj": "self_attn.o_proj",
             "input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm",
             "mlp.linear_fc2": "mlp.down_proj"}
    for key, value in sd.items():
        layer, rest = key[len("decoder.layers."):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module == "mlp.linear_fc1":
            gate, up = value.chunk(2)
            out[f"model.layers.{layer}.mlp.gate_proj.{param}"] = gate
            out[f"model.layers.{layer}.mlp.up_proj.{param}"] = up
            continue
        out[f"model.layers.{layer}.{names[module]}.{param}"] = value
    return out


def _logits_and_transformers(config, rope_parameters=None, rotary_base=10000,
                             hf_positions=SEQ):
    """Our logits and transformers' DeepSeek-V3 logits (weights copied) on SEQ tokens."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    init_single_process()
    try:
        model_parallel_manual_seed(5)
        model = GPTModel(config, get_gpt_decoder_block_spec(config), vocab_size=VOCAB,
                         max_sequence_length=SEQ, position_embedding_type="rope",
                         rotary_base=rotary_base,
                         share_embeddings_and_output_weights=False).eval()
        hf_config = DeepseekV3Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, first_k_dense_replace=2,
            max_position_embeddings=hf_positions, rms_norm_eps=1e-6, rope_interleave=True,
            tie_word_embeddings=False, attention_bias=False,
            rope_parameters=rope_parameters or dict(rope_type="default", rope_theta=10000.0))
        hf = DeepseekV3ForCausalLM(hf_config).eval()
        missing, unexpected = hf.load_state_dict(_hf_state(model), strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
        tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return model(tokens, None, None), hf(tokens).logits
    finally:
        destroy_single_process()


def test_logits_equal_transformers_deepseek_v3():
    ours, theirs = _logits_and_transformers(mla_config())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# A ramp over both rotary pairs (base 100, original context 64, beta_fast 4), and a
# cos/sin factor m(4, 0.8) / m(4, 0.6) != 1 next to the softmax factor m(4, 0.6)^2.
YARN = dict(rotary_scaling_factor=4.0, original_max_position_embeddings=64, beta_fast=4.0,
            beta_slow=1.0, mscale=0.8, mscale_all_dim=0.6)


def test_yarn_logits_equal_transformers_deepseek_v3():
    hf_yarn = dict(rope_type="yarn", rope_theta=100.0, factor=4.0,
                   **{k: v for k, v in YARN.items() if k != "rotary_scaling_factor"})
    ours, theirs = _logits_and_transformers(mla_config(rope_type="yarn", **YARN), hf_yarn,
                                            rotary_base=100, hf_positions=256)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    plain, _ = _logits_and_transformers(mla_config(), rotary_base=100)
    assert (plain - ours).abs().max() > 1e-3  # YaRN moves logits by 100x the tolerance


def test_yarn_frequencies_ramp_between_kept_and_interpolated():
    from megacore.transformer.yarn_rotary_pos_embedding import yarn_scaled_inv_freq

    plain = 1.0 / (100.0 ** (torch.arange(0, 16, 2) / 16))
    yarn = yarn_scaled_inv_freq(16, 100.0, 4.0, 64, 4.0, 1.0)
    ratio = plain / yarn  # 1 for kept (fast) pairs, 4 for interpolated (slow) ones
    assert ratio[0] == 1 and ratio[-1] == 4
    assert ((ratio > 1) & (ratio < 4)).any() and (ratio.diff() >= 0).all()


def test_latent_kv_cache_generates_like_recompute():
    from megacore.transformer import StaticInferenceContext

    init_single_process()
    try:
        model = build(mla_config()).eval()
        tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            full = model(tokens, None, None)
            context = StaticInferenceContext(max_batch_size=2, max_sequence_length=SEQ)
            steps = [model(tokens[:, :5], None, None, inference_context=context)]
            context.sequence_len_offset = 5
            for t in range(5, SEQ):
                steps.append(model(tokens[:, t:t + 1], None, None, inference_context=context))
                context.sequence_len_offset += 1
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        # The cache holds the latent and the rotary key: L + r values per token and layer.
        latent, k_pe = context.key_value_memory_dict[1]
        assert latent.shape[2:] == (1, MLA["kv_lora_rank"])
        assert k_pe.shape[2:] == (1, MLA["qk_pos_emb_head_dim"])
    finally:
        destroy_single_process()


def test_mla_refuses_query_groups_and_odd_rotary_width():
    with pytest.raises(ValueError, match="no key/value groups"):
        mla_config(num_query_groups=2)
    with pytest.raises(ValueError, match="qk_pos_emb_head_dim must be even"):
        mla_config(qk_pos_emb_head_dim=3)


def test_yarn_refuses_what_it_cannot_combine_with():
    with pytest.raises(ValueError, match="needs --multi-latent-attention"):
        mla_config(rope_type="yarn", multi_latent_attention=False)
    with pytest.raises(ValueError, match="rope_type must be 'rope' or 'yarn'"):
        mla_config(rope_type="llama3")
    with pytest.raises(ValueError, match="needs beta_slow > 0"):
        mla_config(rope_type="yarn", beta_slow=0)
    init_single_process()
    try:
        config = mla_config(rope_type="yarn", **YARN)
        spec = get_gpt_decoder_block_spec(config)
        with pytest.raises(ValueError, match="cannot be combined with --use-rope-scaling"):
            GPTModel(config, spec, VOCAB, SEQ, position_embedding_type="rope",
                     rope_scaling=True)
        with pytest.raises(ValueError, match="needs --position-embedding-type rope"):
            GPTModel(config, spec, VOCAB, SEQ, position_embedding_type="none")
    finally:
        destroy_single_process()
