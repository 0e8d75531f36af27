"""FLOPs formula (hand-computed cases, Megatron's closed form), samplers, batch ramp-up."""

import pytest

from megacore.training.data_samplers import MegatronPretrainingSampler
from megacore.training.flops import num_floating_point_operations
from megacore.training.metrics_logger import format_log_line
from megacore.training.num_microbatches_calculator import NumMicroBatchesCalculator


def _megatron_closed_form(b, s, L, h, np_, ng, ffn, V, swiglu=False, topk=1, shared=0):
    # Megatron-LM's num_floating_point_operations (dense/GQA/MoE, kv_channels = h / np).
    gated = 1.5 if swiglu else 1.0
    return 12 * b * s * L * h * h * (
        (1 + ng / np_ + s / h) * 1.0 + (ffn / h) * topk * gated + (shared / h) * gated
        + V / (2 * L * h))


def test_dense_gpt_by_hand():
    # b=1, s=2, L=1, h=4, np=2 (hn=2), ng=2, ffn=8, V=10, per token forward:
    # qkv 2*4*2*(2+4)=96, attention 4*2*2*2=32, proj 2*2*2*4=32, mlp 2*4*8*2=128
    # -> 288 per layer, logits 2*4*10=80 -> 368 per token; x3 (fwd+bwd) x2 tokens = 2208
    assert num_floating_point_operations(
        batch_size=1, seq_length=2, num_layers=1, hidden_size=4, num_attention_heads=2,
        ffn_hidden_size=8, padded_vocab_size=10) == 2208


@pytest.mark.parametrize("ng, swiglu", [(8, False), (2, False), (1, True), (4, True)])
def test_gqa_and_swiglu_match_megatron(ng, swiglu):
    kw = dict(batch_size=8, seq_length=128, num_layers=6, hidden_size=256,
              num_attention_heads=8, ffn_hidden_size=688, padded_vocab_size=50304)
    ours = num_floating_point_operations(num_query_groups=ng, gated_linear_unit=swiglu, **kw)
    ref = _megatron_closed_form(8, 128, 6, 256, 8, ng, 688, 50304, swiglu=swiglu)
    assert ours == pytest.approx(ref, rel=1e-12)


def test_moe_counts_topk_experts_shared_experts_and_router():
    kw = dict(batch_size=2, seq_length=64, num_layers=4, hidden_size=128, num_attention_heads=4,
              ffn_hidden_size=512, padded_vocab_size=1024, gated_linear_unit=True)
    ours = num_floating_point_operations(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=256,
                                         shared_expert_ffn_hidden_size=128, **kw)
    ref = _megatron_closed_form(2, 64, 4, 128, 4, 4, 256, 1024, swiglu=True, topk=2, shared=128)
    router = 3 * 2 * 64 * 4 * (2 * 128 * 8)
    assert ours == pytest.approx(ref + router, rel=1e-12)
    half = num_floating_point_operations(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=256,
                                         moe_layer_fraction=0.5, **kw)
    dense = num_floating_point_operations(**kw)
    moe_only = num_floating_point_operations(num_experts=8, moe_router_topk=2,
                                             moe_ffn_hidden_size=256, **kw)
    assert half == pytest.approx((dense + moe_only) / 2, rel=1e-12)


def test_sampler_slices_global_batches_independently_of_dp():
    def batches(dp, consumed=0):
        return [list(zip(*[b for b in MegatronPretrainingSampler(16, consumed, 2, r, dp)]))
                for r in range(dp)]
    one = [b for b in MegatronPretrainingSampler(16, 0, 2, 0, 1)]
    assert one[0] == [0, 1] and one[1] == [2, 3]
    two = [list(MegatronPretrainingSampler(16, 0, 2, r, 2)) for r in range(2)]
    assert two[0][:2] == [[0, 1], [4, 5]] and two[1][:2] == [[2, 3], [6, 7]]
    resumed = list(MegatronPretrainingSampler(16, 8, 2, 1, 2))
    assert resumed[0] == [10, 11], "resuming at 8 consumed samples continues without gaps"
    del batches


def test_sampler_errors():
    with pytest.raises(ValueError, match="dataset is exhausted"):
        MegatronPretrainingSampler(8, 8, 2, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank 2"):
        MegatronPretrainingSampler(8, 0, 2, 2, 2)


def test_rampup_batch_size():
    calc = NumMicroBatchesCalculator(16, 2, 2, rampup_batch_size=[4, 4, 300])
    assert calc.global_batch_size_at(0) == 4 and calc.num_microbatches_at(0) == 1
    assert calc.global_batch_size_at(100) == 8
    assert calc.global_batch_size_at(299) == 12
    assert calc.global_batch_size_at(10_000) == 16 and calc.num_microbatches_at(10_000) == 4
    with pytest.raises(ValueError, match="whole increments"):
        NumMicroBatchesCalculator(16, 2, 2, rampup_batch_size=[4, 5, 300])


def test_log_line_has_megatron_fields():
    line = format_log_line(10, 100, {"consumed_samples": 80, "lm_loss": 2.5, "lr": 1e-3,
                                     "grad_norm": 0.5, "loss_scale": 1.0})
    assert "iteration       10/     100" in line
    assert "lm loss: 2.500000E+00" in line and "learning rate: 1.000000E-03" in line
