"""Router choices, balancing losses, capacity, permutation and config checks against
hand-computed values (no processes, except where a router needs a process group).

Tolerance: fp32 rtol 1e-6 / atol 1e-7 for formulas computed two ways on a handful of
numbers (only summation order differs).
"""

import math

import pytest
import torch
import torch.distributed as dist

from megacore import parallel_state as ps
from megacore.transformer.moe import (
    GroupedMLP,
    MoEAuxLossAutoScaler,
    MoEConfig,
    SequentialMLP,
    TopKRouter,
    drop_tokens_over_capacity,
    expert_capacity,
    get_moe_layer_pattern,
    get_updated_expert_bias,
    sequence_load_balancing_loss,
    switch_load_balancing_loss,
    topk_routing,
    update_router_expert_bias,
    z_loss,
)
from megacore.transformer.mlp import MLPSubmodules
from megacore.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megacore.transformer.moe.token_permutation import chunk_order, permute, sort_chunks, unpermute
from tests.multirank import run_distributed
from tests.transformer.moe.moe_testing import make_config

TOL = dict(rtol=1e-6, atol=1e-7)
LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                       [0.5, 3.0, 2.5, 0.0],
                       [0.0, 0.0, 1.0, 4.0]])


# -- routing ---------------------------------------------------------------------------
def test_softmax_after_topk_normalizes_the_chosen_logits():
    probs, routing_map = topk_routing(LOGITS, 2)
    e = math.exp
    expected = torch.tensor([[e(2) / (e(2) + e(1)), e(1) / (e(2) + e(1)), 0, 0],
                             [0, e(3) / (e(3) + e(2.5)), e(2.5) / (e(3) + e(2.5)), 0],
                             [0, 0, e(1) / (e(1) + e(4)), e(4) / (e(1) + e(4))]])
    torch.testing.assert_close(probs, expected, **TOL)
    assert routing_map.tolist() == (expected > 0).tolist()


def test_pre_softmax_keeps_full_softmax_values():
    probs, _ = topk_routing(LOGITS, 2, pre_softmax=True)
    full = torch.softmax(LOGITS, dim=-1)
    torch.testing.assert_close(probs[0, :2], full[0, :2], **TOL)
    assert probs.sum(dim=-1).lt(1).all()  # the chosen share of the full softmax


def test_sigmoid_renormalizes_and_expert_bias_only_steers_choice():
    logits = torch.tensor([[0.0, -0.5, 1.0, 4.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, -10.0])
    probs, routing_map = topk_routing(logits, 2, score_function="sigmoid", expert_bias=bias)
    s = torch.sigmoid(logits[0])
    # Without the bias experts 3 and 2 win; with it, experts 2 and 0, weighted by their own
    # sigmoids (the bias is not part of the weights).
    assert routing_map[0].tolist() == [True, False, True, False]
    torch.testing.assert_close(probs[0], torch.stack([s[0], 0 * s[1], s[2], 0 * s[3]])
                               / (s[0] + s[2]), **TOL)


def test_topk_scaling_factor():
    probs, _ = topk_routing(LOGITS, 1, scaling_factor=2.5)
    assert probs.sum(dim=-1).tolist() == [2.5, 2.5, 2.5]


# -- losses ------------------------------------------------------------------------------
def _switch_by_hand(scores, routing_map, topk, coeff):
    tokens, experts = scores.shape
    total = 0.0
    for e in range(experts):
        f_e = routing_map[:, e].sum().item() / (tokens * topk)  # fraction of assignments
        p_e = scores[:, e].mean().item()  # mean score
        total += f_e * p_e
    return coeff * experts * total


def test_switch_loss_matches_formula_and_is_one_when_balanced():
    scores = torch.softmax(LOGITS, dim=-1)
    _, routing_map = topk_routing(LOGITS, 2)
    loss = switch_load_balancing_loss(scores, routing_map.sum(0), 3, 2, 0.1)
    assert loss.item() == pytest.approx(_switch_by_hand(scores, routing_map, 2, 0.1), rel=1e-6)
    uniform = torch.full((4, 4), 0.25)
    balanced = torch.eye(4, dtype=torch.bool)
    assert switch_load_balancing_loss(uniform, balanced.sum(0), 4, 1, 1.0).item() == \
        pytest.approx(1.0)


def test_switch_loss_shares_add_up_over_a_split_batch():
    # Two ranks holding tokens [0:2] and [2:3]: shares with global counts sum to the loss.
    scores = torch.softmax(LOGITS, dim=-1)
    _, routing_map = topk_routing(LOGITS, 2)
    counts = routing_map.sum(0)
    whole = switch_load_balancing_loss(scores, counts, 3, 2, 0.1)
    shares = (switch_load_balancing_loss(scores[:2], counts, 3, 2, 0.1)
              + switch_load_balancing_loss(scores[2:], counts, 3, 2, 0.1))
    torch.testing.assert_close(shares, whole, **TOL)


def test_sequence_loss_is_the_mean_of_per_sequence_switch_losses():
    torch.manual_seed(0)
    s, b, experts, topk = 5, 3, 4, 2
    logits = torch.randn(s, b, experts)
    scores = torch.softmax(logits, dim=-1)
    _, routing_map = topk_routing(logits.view(-1, experts), topk)
    routing_map = routing_map.view(s, b, experts)
    loss = sequence_load_balancing_loss(scores, routing_map.sum(0), s, topk, 0.3)
    by_hand = sum(_switch_by_hand(scores[:, j], routing_map[:, j], topk, 0.3)
                  for j in range(b)) / b
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_z_loss_formula():
    by_hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS.tolist()) / 3
    assert z_loss(LOGITS, 3, 0.01).item() == pytest.approx(0.01 * by_hand, rel=1e-6)


def test_aux_loss_autoscaler_injects_scaled_gradient():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.tensor(3.0, requires_grad=True)
    MoEAuxLossAutoScaler.set_loss_scale(0.5)
    try:
        out = MoEAuxLossAutoScaler.apply(x * 2, w * w)
        out.sum().backward()
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(1.0)
    assert x.grad.tolist() == [2.0, 2.0]
    assert w.grad.item() == pytest.approx(0.5 * 2 * 3.0)  # d(0.5 * w^2)/dw


def _router_gradients():
    """A router's weight grad with aux + z losses equals autograd of the summed loss."""
    ps.initialize_model_parallel()
    cfg = make_config(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01, num_moe_experts=4)
    torch.manual_seed(3)
    router = TopKRouter(cfg)
    x = torch.randn(3, 2, 8)
    result = router(x)
    g = torch.randn(6, 4)
    (result.probs * g).sum().backward()

    w = router.weight.detach().clone().requires_grad_()
    logits = x.reshape(6, 8) @ w.t()
    probs, routing_map = topk_routing(logits, 2)
    scores = torch.softmax(logits, dim=-1)
    loss = ((probs * g).sum()
            + switch_load_balancing_loss(scores, routing_map.sum(0), 6, 2, 0.1)
            + z_loss(logits, 6, 0.01))
    loss.backward()
    torch.testing.assert_close(router.weight.grad, w.grad, rtol=1e-5, atol=1e-6)
    assert result.load_balancing_loss.item() == pytest.approx(
        _switch_by_hand(scores.detach(), routing_map, 2, 1.0), rel=1e-5)
    return True


def test_router_attaches_aux_and_z_loss_gradients():
    assert run_distributed(_router_gradients, 1) == [True]


# -- expert bias ---------------------------------------------------------------------------
def test_expert_bias_update_raises_underloaded_experts():
    bias = get_updated_expert_bias(torch.tensor([6.0, 2.0, 4.0, 4.0]), torch.zeros(4), 0.1)
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])


def _bias_update_over_ranks():
    ps.initialize_model_parallel()
    cfg = make_config(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.5,
                      num_moe_experts=4, moe_router_topk=1)
    torch.manual_seed(3)
    router = TopKRouter(cfg)
    torch.manual_seed(10 + dist.get_rank())
    router(torch.randn(4, 2, 8))
    counts = router.local_tokens_per_expert.clone()
    dist.all_reduce(counts)
    update_router_expert_bias([router])
    expected = 0.5 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(router.expert_bias, expected.float())
    assert router.local_tokens_per_expert.sum().item() == 0
    return router.expert_bias.tolist()


def test_expert_bias_update_uses_counts_of_all_ranks():
    first, second = run_distributed(_bias_update_over_ranks, 2)
    assert first == second


# -- capacity and permutation ------------------------------------------------------------
def test_capacity_formula():
    assert expert_capacity(16, 2, 8, 0.5) == 2
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 1, 3, 1.0) == 4  # ceil(3.33)


def test_drop_policies_worked_example():
    # The example of token_dropping's docstring: capacity 2 for expert 0.
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    routing_map = torch.tensor([[True, False], [True, False], [False, True], [True, False]])
    capacity = expert_capacity(4, 1, 2, 1.0)
    assert capacity == 2
    _, kept = drop_tokens_over_capacity(probs * routing_map, routing_map, capacity, "probs")
    assert kept[:, 0].tolist() == [False, True, False, True]
    _, kept = drop_tokens_over_capacity(probs * routing_map, routing_map, capacity, "position")
    assert kept[:, 0].tolist() == [True, True, False, False]
    assert kept[:, 1].tolist() == [False, False, True, False]


def test_permute_unpermute_round_trip_with_and_without_padding():
    tokens = torch.arange(6.0).view(3, 2)
    routing_map = torch.tensor([[True, True], [False, True], [True, False]])
    probs = routing_map.float() * 0.5
    permuted, permuted_probs, ids, counts = permute(tokens, routing_map, probs)
    assert ids.tolist() == [0, 2, 0, 1] and counts.tolist() == [2, 2]
    torch.testing.assert_close(unpermute(permuted, ids, permuted_probs, 3),
                               tokens * routing_map.sum(1, keepdim=True) * 0.5)
    padded, padded_probs, pids, pcounts = permute(tokens, routing_map, probs, capacity=3)
    assert pids.tolist() == [0, 2, 3, 0, 1, 3] and pcounts.tolist() == [3, 3]
    assert padded[2].abs().sum() == 0  # padding row reads zeros
    torch.testing.assert_close(unpermute(padded + 1, pids, padded_probs, 3),
                               unpermute(permuted + 1, ids, permuted_probs, 3))


def test_sort_chunks_transposes_source_expert_order():
    assert chunk_order(2, 3) == [0, 3, 1, 4, 2, 5]
    x = torch.arange(6.0).unsqueeze(1)  # chunks (src0: e0 e1 e2 | src1: e0 e1 e2), sizes 1..
    sizes = [1, 0, 2, 1, 1, 1]
    y = sort_chunks(x, sizes, chunk_order(2, 3))
    assert y.flatten().tolist() == [0.0, 3.0, 4.0, 1.0, 2.0, 5.0]
    back = sort_chunks(y, [sizes[i] for i in chunk_order(2, 3)], chunk_order(3, 2))
    assert back.flatten().tolist() == x.flatten().tolist()


# -- config ------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, name", [
    (dict(num_moe_experts=0), "num_moe_experts"),
    (dict(num_moe_experts=4, moe_router_topk=5), "moe_router_topk"),
    (dict(moe_router_load_balancing_type="sinkhorn"), "moe_router_load_balancing_type"),
    (dict(moe_router_score_function="relu"), "moe_router_score_function"),
    (dict(moe_router_score_function="sigmoid", moe_router_pre_softmax=True),
     "moe_router_pre_softmax"),
    (dict(moe_token_dispatcher_type="flex"), "moe_token_dispatcher_type"),
    (dict(moe_pad_expert_input_to_capacity=True), "moe_pad_expert_input_to_capacity"),
    (dict(moe_expert_capacity_factor=0.0), "moe_expert_capacity_factor"),
    (dict(moe_token_drop_policy="random"), "moe_token_drop_policy"),
    (dict(moe_layer_freq=[1, 2]), "moe_layer_freq"),
    (dict(moe_aux_loss_coeff=-1.0), "moe_aux_loss_coeff"),
])
def test_config_rejects_bad_fields_by_name(fields, name):
    with pytest.raises(ValueError, match=name):
        MoEConfig(**fields)


def test_config_runs_the_parent_post_init():
    with pytest.raises(ValueError, match="hidden_size"):
        make_config(hidden_size=0)  # TransformerConfig's own check still runs


def test_moe_layer_pattern():
    assert get_moe_layer_pattern(1, 3) == [True, True, True]
    assert get_moe_layer_pattern(2, 4) == [True, False, True, False]
    assert get_moe_layer_pattern([0, 1, 1], 3) == [False, True, True]
    with pytest.raises(ValueError, match="moe_layer_freq"):
        get_moe_layer_pattern([1, 0], 3)


# -- expert init ---------------------------------------------------------------------------
def _grouped_holds_sequential_weights():
    ps.initialize_model_parallel()
    checked = 0
    for gated in (False, True):
        cfg = make_config(gated_linear_unit=gated)
        torch.manual_seed(5)
        seq = SequentialMLP(8, cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                  linear_fc2=RowParallelLinear))
        grouped = GroupedMLP(8, cfg)
        for e, expert in enumerate(seq.local_experts):
            torch.testing.assert_close(grouped.weight1[e], expert.linear_fc1.weight.t(),
                                       rtol=0, atol=0)
            torch.testing.assert_close(grouped.weight2[e], expert.linear_fc2.weight.t(),
                                       rtol=0, atol=0)
        assert not torch.equal(grouped.weight1[0], grouped.weight1[1])
        checked += 1
    return checked


def test_grouped_mlp_holds_the_sequential_mlp_weights():
    assert run_distributed(_grouped_holds_sequential_weights, 1) == [2]
