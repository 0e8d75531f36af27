"""TransformerConfig: derived defaults and validation messages that name the fields."""

import math

import pytest
import torch

from megacore.transformer import TransformerConfig

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=8, kv_channels=8)


def test_derived_defaults():
    c = TransformerConfig(**BASE)
    assert (c.ffn_hidden_size, c.kv_channels, c.num_query_groups) == (256, 8, 8)
    torch.manual_seed(0)
    w = c.output_layer_init_method(torch.empty(20000))
    # scaled init: std / sqrt(2 * num_layers)
    assert abs(w.std().item() - 0.02 / math.sqrt(8)) < 2e-4


@pytest.mark.parametrize("overrides, field", [
    (dict(num_query_groups=3), "num_query_groups"),
    (dict(tensor_model_parallel_size=16), "tensor_model_parallel_size"),
    (dict(num_query_groups=4, tensor_model_parallel_size=8, num_attention_heads=16),
     None),  # valid: each group replicated over 2 ranks
    (dict(num_query_groups=3, tensor_model_parallel_size=2, num_attention_heads=6),
     "num_query_groups"),
    (dict(ffn_hidden_size=100, tensor_model_parallel_size=8), "ffn_hidden_size"),
    (dict(normalization="BatchNorm"), "normalization"),
    (dict(hidden_dropout=1.0), "hidden_dropout"),
    (dict(recompute_granularity="full"), "recompute_method"),
    (dict(recompute_granularity="full", recompute_method="block"), "recompute_num_layers"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=5),
     "recompute_num_layers"),
    (dict(recompute_granularity="selective", recompute_method="uniform"), "recompute_method"),
    (dict(recompute_granularity="sometimes"), "recompute_granularity"),
    (dict(apply_query_key_layer_scaling=True, attention_softmax_in_fp32=False),
     "attention_softmax_in_fp32"),
    (dict(distribute_saved_activations=True, sequence_parallel=True,
          tensor_model_parallel_size=2, recompute_granularity="full",
          recompute_method="uniform", recompute_num_layers=1), "sequence_parallel"),
    (dict(hidden_size=60, num_attention_heads=8, kv_channels=None), "kv_channels"),
    (dict(num_layers=0), "num_layers"),
])
def test_validation_names_the_field(overrides, field):
    kw = dict(BASE)
    kw.update(overrides)
    if field is None:
        TransformerConfig(**kw)
        return
    with pytest.raises(ValueError, match=field):
        TransformerConfig(**kw)
