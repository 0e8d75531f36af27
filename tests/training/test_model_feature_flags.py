"""Flags of the Hugging Face families' features: parsed into the configs, saved with a
checkpoint and restored from it, and rejected with messages naming the flags."""

import pytest
import torch

from megacore.training.arguments import (
    ArgumentValidationError,
    model_flags_from_config,
    parse_args,
    run_config_to_dict,
)
from megacore.transformer.activations import openai_gelu

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--position-embedding-type", "rope"]
FEATURES = ["--window-size", "4095", "0", "--openai-gelu", "--use-rope-scaling",
            "--rope-scaling-factor", "32", "--rope-scaling-low-freq-factor", "2",
            "--rope-scaling-high-freq-factor", "8",
            "--rope-scaling-original-max-position-embeddings", "4096",
            "--add-qkv-bias", "--qk-layernorm"]


def _parse(argv, **kw):
    return parse_args(argv, world_size=1, for_inference=True, **kw)


def test_flags_set_the_configs_and_come_back_from_a_checkpoint():
    run = _parse(BASE + FEATURES)
    m, g = run.model, run.gpt
    assert m.window_size == (4095, 0) and m.activation_func is openai_gelu
    assert m.add_qkv_bias and m.qk_layernorm
    assert (g.use_rope_scaling, g.rope_scaling_factor, g.rope_scaling_low_freq_factor,
            g.rope_scaling_high_freq_factor,
            g.rope_scaling_original_max_position_embeddings) == (True, 32.0, 2.0, 8.0, 4096)
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(m.activation_func(x),
                               0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3))))

    saved = run_config_to_dict(run)
    restored = run_config_to_dict(_parse([], checkpoint_config=saved))
    for section in ("model", "gpt"):
        assert restored[section] == saved[section], section
    assert _parse(model_flags_from_config(saved)).model.window_size == (4095, 0)
    # Megatron's comma form and the saved value agree; another window is an error.
    assert _parse(["--window-size", "4095,0"], checkpoint_config=saved).model.window_size \
        == (4095, 0)
    with pytest.raises(ArgumentValidationError, match=r"--window-size \(10, 0\) does not "
                                                      r"match the value \(4095, 0\)"):
        _parse(["--window-size", "10", "0"], checkpoint_config=saved, checkpoint_path="c")


@pytest.mark.parametrize("argv, message", [
    (["--window-size", "7"], r"--window-size \['7'\]: expected two integers"),
    (["--window-size", "3", "0", "--context-parallel-size", "2", "--seq-length", "8"],
     r"not supported with context_parallel_size 2.*\[flags: --context-parallel-size, "
     r"--window-size\]"),
    (["--openai-gelu", "--swiglu"], "--openai-gelu and --swiglu are alternatives"),
    (["--use-rope-scaling", "--rope-scaling-low-freq-factor", "4"],
     r"rope_scaling_low_freq_factor < rope_scaling_high_freq_factor.*"
     r"--rope-scaling-low-freq-factor"),
])
def test_bad_feature_flags_are_rejected_naming_them(argv, message):
    with pytest.raises(ArgumentValidationError, match=message):
        parse_args(BASE + argv, world_size=2, for_inference=True)


def test_a_converted_tanh_gelu_checkpoint_restores_openai_gelu():
    # Conversions record the activation in their "conversion" section ("gelu_tanh").
    saved = run_config_to_dict(_parse(BASE))
    saved["model"].pop("activation_func")
    saved["conversion"] = {"vocab_size": 61, "activation": "gelu_tanh"}
    assert _parse([], checkpoint_config=saved).model.activation_func is openai_gelu


YARN = ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16",
        "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4", "--v-head-dim", "8",
        "--rope-type", "yarn", "--rotary-scaling-factor", "40", "--mscale", "0.5",
        "--mscale-all-dim", "0.7", "--yarn-original-max-position-embeddings", "4096",
        "--yarn-beta-fast", "16", "--yarn-beta-slow", "2"]


def test_yarn_flags_set_the_mla_config_and_come_back_from_a_checkpoint():
    m = _parse(BASE + YARN).model
    assert (m.rope_type, m.rotary_scaling_factor, m.mscale, m.mscale_all_dim,
            m.original_max_position_embeddings, m.beta_fast, m.beta_slow) == \
        ("yarn", 40.0, 0.5, 0.7, 4096, 16.0, 2.0)
    saved = run_config_to_dict(_parse(BASE + YARN))
    assert run_config_to_dict(_parse([], checkpoint_config=saved))["model"] == saved["model"]
    assert _parse(model_flags_from_config(saved)).model.beta_slow == 2.0


@pytest.mark.parametrize("argv, message", [
    (["--rope-type", "yarn"], r"needs --multi-latent-attention.*\[flags: .*--rope-type"),
    (YARN + ["--use-rope-scaling"], "--rope-type yarn and --use-rope-scaling are alternatives"),
    (YARN + ["--rotary-percent", "0.5"], "drop --rotary-percent 0.5"),
    (YARN + ["--yarn-beta-fast", "0"], r"needs beta_fast > 0.*--yarn-beta-fast"),
])
def test_bad_yarn_flags_are_rejected_naming_them(argv, message):
    with pytest.raises(ArgumentValidationError, match=message):
        parse_args(BASE + argv, world_size=1, for_inference=True)
