"""``--transformer-impl transformer_engine``: errors where TE cannot run, and the wrappers'
contract (megacore init, return values, local checkpoint names).

Transformer Engine does not run on this CPU machine, so the wrapper test swaps in a small
stand-in with TE's constructor arguments and parameter names (``weight``, ``bias``,
``layer_norm_weight``, ``layer_norm_bias``, an ``_extra_state``) computing the same math
in torch. It checks megacore's side only: weights come from megacore's layout-independent
init, forward equals the local spec's, and the state dict carries the local names both
ways. TE's own kernels are exercised only on a GPU (not in this suite).
"""

import pytest
import torch
import torch.nn.functional as F

from megacore import parallel_state as ps
from megacore.models.gpt import (
    GPTModel,
    get_gpt_decoder_block_spec,
    get_llama_layer_local_spec,
    llama_config_kwargs,
)
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.training import ArgumentValidationError, parse_args
from megacore.transformer import TransformerConfig
from megacore.transformer import extensions
from tests.multirank import run_distributed

VOCAB, SEQ = 64, 16


class _FakeTEModule(torch.nn.Module):
    def get_extra_state(self):
        return torch.tensor([1.0])  # TE keeps FP8 metadata here

    def set_extra_state(self, state):
        assert state is None or torch.is_tensor(state)


class _LayerNormLinear(_FakeTEModule):
    def __init__(self, in_features, out_features, *, eps, tp_size, bias, normalization,
                 return_bias, params_dtype, parallel_mode, **kwargs):
        super().__init__()
        assert parallel_mode == "column" and tp_size == 1
        self.eps, self.normalization, self.return_bias = eps, normalization, return_bias
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(in_features))
        if normalization == "LayerNorm":
            self.layer_norm_bias = torch.nn.Parameter(torch.zeros(in_features))

    def forward(self, x):
        if self.normalization == "RMSNorm":
            x = F.rms_norm(x, (x.size(-1),), self.layer_norm_weight, self.eps)
        else:
            x = F.layer_norm(x, (x.size(-1),), self.layer_norm_weight, self.layer_norm_bias,
                             self.eps)
        out = F.linear(x, self.weight, None if self.return_bias else self.bias)
        return (out, self.bias) if self.return_bias else out


class _Linear(_FakeTEModule):
    def __init__(self, in_features, out_features, *, tp_size, bias, return_bias,
                 parallel_mode, **kwargs):
        super().__init__()
        assert parallel_mode == "row" and tp_size == 1
        self.return_bias = return_bias
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        out = F.linear(x, self.weight, None if self.return_bias else self.bias)
        return (out, self.bias) if self.return_bias else out


class _DotProductAttention(_FakeTEModule):
    def __init__(self, num_attention_heads, kv_channels, *, qkv_format, attn_mask_type,
                 softmax_scale, **kwargs):
        super().__init__()
        assert qkv_format == "sbhd" and attn_mask_type == "causal"
        self.scale = softmax_scale

    def forward(self, q, k, v, attention_mask=None, attn_mask_type=None):
        assert attn_mask_type == "causal"
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             enable_gqa=True)
        s, b = out.size(2), out.size(0)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class _FakeTE:
    LayerNormLinear, Linear, DotProductAttention = _LayerNormLinear, _Linear, _DotProductAttention

    class RMSNorm(torch.nn.Module):
        def __init__(self, hidden_size, eps, **kwargs):
            super().__init__()
            self.eps, self.weight = eps, torch.nn.Parameter(torch.ones(hidden_size))

        def forward(self, x):
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def _config(impl):
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                             ffn_hidden_size=64, transformer_impl=impl,
                             **llama_config_kwargs(num_query_groups=2))


def _wrappers_keep_the_local_contract():
    extensions._te = _FakeTE
    extensions.te_usable = lambda: True
    ps.initialize_model_parallel()
    models = {}
    for impl in ("local", "transformer_engine"):
        model_parallel_manual_seed(11)
        spec = get_gpt_decoder_block_spec(_config(impl)) if impl != "local" \
            else get_llama_layer_local_spec()
        models[impl] = GPTModel(_config(impl), spec, VOCAB, SEQ, position_embedding_type="rope")
    local, te = models["local"], models["transformer_engine"]
    local_state, te_state = local.state_dict(), te.state_dict()
    same_names = sorted(te_state) == sorted(local_state)
    same_init = all(torch.equal(te_state[k], v) for k, v in local_state.items())
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():  # perturb norms so the fused-norm mapping matters, then load
        for name, value in local_state.items():
            value.add_(0.01 * torch.randn(value.shape))
        te.load_state_dict(local.state_dict())
        diff = (te(ids, pos, None) - local(ids, pos, None)).abs().max().item()
    fused = type(te.decoder.layers[0].self_attention.linear_qkv).__name__
    return same_names, same_init, diff, fused


def test_transformer_engine_wrappers_keep_megacore_init_and_names():
    same_names, same_init, diff, fused = run_distributed(_wrappers_keep_the_local_contract, 1)[0]
    assert fused == "TELayerNormColumnParallelLinear"
    assert same_names and same_init
    assert diff < 1e-5


def test_transformer_engine_impl_stops_where_te_cannot_run():
    if extensions.te_usable():
        pytest.skip("Transformer Engine runs here")
    with pytest.raises(ArgumentValidationError, match="--transformer-impl transformer_engine"):
        parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                    "--seq-length", "16", "--lr", "1e-3", "--train-iters", "1", "--mock-data",
                    "--vocab-size", "64", "--micro-batch-size", "1", "--transformer-impl",
                    "transformer_engine"], world_size=1)
    with pytest.raises(RuntimeError, match="--transformer-impl transformer_engine.*--transformer-impl local"):
        get_gpt_decoder_block_spec(_config("transformer_engine"))
    with pytest.raises(ValueError, match="transformer_impl"):
        _config("te")
