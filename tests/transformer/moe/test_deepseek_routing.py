"""DeepSeek-V3 and Qwen3-MoE routing: group-limited top-k, the scaling factor, normalized
top-k and the aux-loss-free expert-bias update, against hand-worked values and against
``transformers``' own routers (tiny random configs)."""

import pytest
import torch
import torch.nn.functional as F

from megacore.transformer.moe import (
    TopKRouter,
    group_limited_choice,
    topk_routing,
    update_router_expert_bias,
)
from tests.inference.tiny_model import destroy_single_process, init_single_process
from tests.transformer.moe.moe_testing import make_config


def test_group_limited_choice_worked_example():
    scores = torch.tensor([[.9, .1, .2, .2, .8, .7, .0, .3]])
    masked = group_limited_choice(scores, topk=2, num_groups=4, group_topk=2)
    assert torch.isinf(masked).tolist() == [[False, False, True, True, False, False, True, True]]
    _, routing_map = topk_routing(torch.logit(scores), 2, "sigmoid", num_groups=4, group_topk=2)
    assert routing_map.nonzero()[:, 1].tolist() == [0, 4]
    # One group allowed: groups score the sum of their best 2 = [1.0 .4 1.5 .3], so group 2
    # wins even though expert 0 holds the single best score.
    _, one_group = topk_routing(torch.logit(scores), 2, "sigmoid", num_groups=4, group_topk=1)
    assert one_group.nonzero()[:, 1].tolist() == [4, 5]


def test_matches_transformers_deepseek_v3_router():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    cfg = DeepseekV3Config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=4, n_group=4,
                           topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    hf = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        hf.weight.normal_()
        hf.e_score_correction_bias.normal_(std=0.3)
    x = torch.randn(64, 16)
    _, weights, indices = hf(x)
    expected = torch.zeros(64, 8).scatter(1, indices, weights)
    logits = F.linear(x, hf.weight)
    probs, routing_map = topk_routing(logits, 4, "sigmoid", expert_bias=hf.e_score_correction_bias,
                                      scaling_factor=2.5, num_groups=4, group_topk=2)
    assert torch.equal(routing_map, expected > 0)
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)


def test_default_softmax_routing_is_qwen3_moe_normalized_topk():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(1)
    cfg = Qwen3MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=True)
    hf = Qwen3MoeTopKRouter(cfg)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(64, 16)
    out = hf(x)
    weights, indices = out[1], out[2]
    expected = torch.zeros(64, 8).scatter(1, indices, weights.float())
    probs, _ = topk_routing(F.linear(x, hf.weight), 2)  # softmax over the chosen logits
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad, message", [
    (dict(moe_router_num_groups=3), "go together"),
    (dict(moe_router_num_groups=3, moe_router_group_topk=1), "must divide"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=5), "group_topk must be in"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk=3), "multiple of"),
])
def test_group_limited_routing_config_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        make_config(**bad)


def test_expert_bias_update_is_the_same_with_and_without_gradient_accumulation():
    """The bias moves once per optimizer step from the tokens of the whole global batch, so
    one micro-batch of 8 sequences and 4 micro-batches of 2 give the same update."""
    init_single_process()
    try:
        config = make_config(moe_router_score_function="sigmoid", moe_router_topk=4,
                             moe_router_enable_expert_bias=True, moe_router_num_groups=4,
                             moe_router_group_topk=2, moe_router_load_balancing_type="none",
                             moe_router_bias_update_rate=0.01)
        torch.manual_seed(3)
        batch = torch.randn(6, 8, 8)  # [s, b=8 sequences, h]
        biases = []
        for micro_batches in (1, 4):
            torch.manual_seed(2)
            router = TopKRouter(config)
            for _ in range(2):  # two optimizer steps
                for chunk in batch.chunk(micro_batches, dim=1):
                    router(chunk)
                update_router_expert_bias([router])
            biases.append(router.expert_bias.clone())
        assert torch.equal(biases[0], biases[1])
        assert biases[0].abs().sum() > 0  # the update did move the bias
        # Hand-worked first step: bias += rate * sign(mean_load - load).
        torch.manual_seed(2)
        router = TopKRouter(config)
        load = router(batch).tokens_per_expert.double()
        update_router_expert_bias([router])
        torch.testing.assert_close(router.expert_bias,
                                   (0.01 * torch.sign(load.mean() - load)).float())
    finally:
        destroy_single_process()
