"""The MoE layer in every expert layout equals a single-process MoE layer.

Each rank builds the parallel layer and a single-process reference (groups of one rank)
from the same seed. Data-parallel replica ``d`` feeds the micro-batch ``xs[d]`` (split over
tp under sequence parallelism); the reference runs the replicas one by one. Without DDP the
test reduces grads itself, as DDP + ``finalize_model_grads`` would, but summing instead of
averaging so they compare with the sum of the reference's per-replica grads:

* dense params (router, shared expert): sum over dp; router weight and shared-expert gate
  (``sequence_parallel=True``) first over tp, as each tp rank routed its own tokens;
* expert params (``allreduce=False``): sum over the expert-data-parallel group.

Tolerance: fp32 rtol 1e-5 / atol 1e-5. The parallel layer sums the same products in other
orders (per-rank partial sums, all-reduces, a different row order in index_add), which
moves results by ~1e-7; routing decisions are identical because logits agree to ~1 ulp
and random inputs have no near-ties.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore import parallel_state as ps
from megacore.transformer.moe import MoELayer, reduce_moe_metrics
from tests.multirank import run_distributed
from tests.transformer.moe.moe_testing import make_config, single_rank_collection

TOL = dict(rtol=1e-5, atol=1e-5)
S, B, H = 8, 2, 8
SEED = 1234
LOSSES = dict(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)

VARIANTS = [
    dict(moe_router_load_balancing_type="aux_loss", **LOSSES),
    dict(moe_router_score_function="sigmoid", moe_router_load_balancing_type="seq_aux_loss",
         gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
         moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True, **LOSSES),
    dict(moe_router_pre_softmax=True, moe_router_topk=3, moe_router_topk_scaling_factor=2.0,
         moe_shared_expert_intermediate_size=8, **LOSSES),
    dict(moe_router_topk=1, moe_router_load_balancing_type="none", moe_z_loss_coeff=1e-3,
         gated_linear_unit=True),
]

# (tp, sequence_parallel, ep, expert tp) on 4 ranks
LAYOUTS = [
    (1, False, 1, 1), (1, False, 2, 1), (1, False, 4, 1), (1, False, 2, 2), (1, False, 1, 2),
    (2, False, 2, 1), (2, True, 2, 1), (2, True, 2, 2), (2, False, 1, 2), (2, True, 4, 1),
    (2, True, 1, 2), (2, False, 4, 1),
]


def _data(replicas=4):
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(replicas, S, B, H, generator=gen),
            torch.randn(replicas, S, B, H, generator=gen))


# -- reference -------------------------------------------------------------------------
def _build(cfg, prepare=None, **kwargs):
    torch.manual_seed(SEED)
    layer = MoELayer(cfg, **kwargs)
    if prepare is not None:
        prepare(layer)
    return layer


def _reference(cfg, one, xs, gs, replicas, prepare=None):
    """Single-process layer run on each replica: (outputs, input grads, param grads, metrics)."""
    ref = _build(cfg, prepare, pg_collection=one)
    outs, xgrads, grads = [], [], []
    for d in range(replicas):
        ref.zero_grad(set_to_none=True)
        x = xs[d].clone().requires_grad_()
        y, _ = ref(x)
        (y * gs[d]).sum().backward()
        outs.append(y.detach())
        xgrads.append(x.grad)
        grads.append({n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
                      for n, p in ref.named_parameters()})
    summed = {n: sum(g[n] for g in grads) for n in grads[0]}
    return outs, xgrads, summed, reduce_moe_metrics([ref], group=one.tp_dp_cp)


# -- parallel side -----------------------------------------------------------------------
def _shard_like(full, param, group):
    """This rank's shard of ``full`` by the param's partition attributes."""
    if not getattr(param, "tensor_model_parallel", False) or dist.get_world_size(group) == 1:
        return full
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    blocks = full.chunk(size * param.partition_stride, dim=param.partition_dim)
    return torch.cat(blocks[rank::size], dim=param.partition_dim)


def _reference_grad(name, param, model, ref_grads, pgs):
    """The reference grad matching local param ``name`` (global expert index, shard)."""
    local = model.num_local_experts
    first = pgs.rank("ep") * local
    if ".local_experts." in name:
        prefix, rest = name.split(".local_experts.")
        index, tail = rest.split(".", 1)
        full = ref_grads[f"{prefix}.local_experts.{first + int(index)}.{tail}"]
    elif name.startswith("experts."):  # GroupedMLP: [E, ...] stacked
        full = ref_grads[name][first:first + local]
    else:
        full = ref_grads[name]
    expert = not getattr(param, "allreduce", True)
    return _shard_like(full, param, pgs.expt_tp if expert else pgs.tp)


def _reduce_grads(model, pgs):
    for param in model.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        if not getattr(param, "allreduce", True):
            dist.all_reduce(param.grad, group=pgs.expt_dp)
            continue
        if getattr(param, "sequence_parallel", False) and pgs.size("tp") > 1:
            dist.all_reduce(param.grad, group=pgs.tp)
        dist.all_reduce(param.grad, group=pgs.dp)


def _local(t, cfg, pgs):
    """Replica tensor ``[s, b, h]`` as this rank holds it (sequence slice under SP)."""
    if cfg.sequence_parallel:
        return t.chunk(pgs.size("tp"))[pgs.rank("tp")]
    return t


def _check_case(cfg, ref, xs, gs, pgs, label, prepare=None):
    ref_outs, ref_xgrads, ref_grads, ref_metrics = ref
    model = _build(cfg, prepare)
    d = pgs.rank("dp")
    x = _local(xs[d], cfg, pgs).clone().requires_grad_()
    y, bias = model(x)
    assert bias is None
    torch.testing.assert_close(y, _local(ref_outs[d], cfg, pgs), **TOL, msg=label)
    (y * _local(gs[d], cfg, pgs)).sum().backward()
    torch.testing.assert_close(x.grad, _local(ref_xgrads[d], cfg, pgs), **TOL, msg=label)
    _reduce_grads(model, pgs)
    names = [n for n, _ in model.named_parameters()]
    assert names, label
    for name, param in model.named_parameters():
        expected = _reference_grad(name, param, model, ref_grads, pgs)
        torch.testing.assert_close(param.grad, expected, **TOL, msg=f"{label}: {name}")
    metrics = reduce_moe_metrics([model], group=pgs.tp_dp_cp)
    assert metrics.keys() == ref_metrics.keys(), label
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{label}: {key}"


def _layouts_equal_reference(layouts):
    one = single_rank_collection()
    xs, gs = _data()
    refs = {}
    checked = 0
    for index, (tp, sp, ep, etp) in enumerate(layouts):
        pgs = ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                           expert_model_parallel_size=ep,
                                           expert_tensor_parallel_size=etp)
        variant = index % len(VARIANTS)
        dp = pgs.size("dp")
        for dispatcher in ("allgather", "alltoall"):
            for grouped in (False, True):
                key = (variant, grouped, dp)
                if key not in refs:
                    refs[key] = _reference(make_config(moe_grouped_gemm=grouped,
                                                       **VARIANTS[variant]), one, xs, gs, dp)
                cfg = make_config(tensor_model_parallel_size=tp, sequence_parallel=sp,
                                  expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                  moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=grouped,
                                  **VARIANTS[variant])
                label = (f"tp={tp} sp={sp} ep={ep} etp={etp} {dispatcher} grouped={grouped} "
                         f"variant={variant}")
                _check_case(cfg, refs[key], xs, gs, pgs, label)
                checked += 1
        ps.destroy_model_parallel()
    return checked


def test_moe_layer_matches_single_process_in_every_layout():
    results = run_distributed(_layouts_equal_reference, 4, args=(LAYOUTS,), timeout=300)
    assert results == [4 * len(LAYOUTS)] * 4


# -- zero-token rank ---------------------------------------------------------------------
def _starved_rank_case():
    """Expert bias -1e4 on ep rank 1's experts: it receives no tokens but must still take
    part in every collective, forward and backward, and end with zero expert grads."""
    one = single_rank_collection()
    xs, gs = _data()
    checked = 0
    for ep, etp in ((2, 1), (2, 2)):
        pgs = ps.initialize_model_parallel(expert_model_parallel_size=ep,
                                           expert_tensor_parallel_size=etp)
        dp = pgs.size("dp")
        for dispatcher in ("allgather", "alltoall"):
            for grouped in (False, True):
                fields = dict(moe_grouped_gemm=grouped, moe_router_enable_expert_bias=True,
                              moe_router_load_balancing_type="none")
                ref_cfg = make_config(**fields)
                cfg = make_config(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                  moe_token_dispatcher_type=dispatcher, **fields)
                label = f"starved ep={ep} etp={etp} {dispatcher} grouped={grouped}"
                ref = _reference(ref_cfg, one, xs, gs, dp, prepare=_starve_ep_rank_1)
                assert ref[3]["moe/experts_without_tokens"] == 4.0, label
                _check_case(cfg, ref, xs, gs, pgs, label, prepare=_starve_ep_rank_1)
                checked += 1
        ps.destroy_model_parallel()
    return checked


def _starve_ep_rank_1(layer):
    # The expert bias only steers the choice: experts 4..7 (ep rank 1 at ep=2) never win.
    layer.router.expert_bias[4:] = -1e4


def test_rank_whose_experts_get_no_tokens():
    assert run_distributed(_starved_rank_case, 4, timeout=120) == [8] * 4


# -- capacity --------------------------------------------------------------------------
def _kept_by_formula(probs, routing_map, factor, policy):
    """Independent (loop) version of the capacity rule: which (token, expert) survive."""
    tokens, experts = routing_map.shape
    topk = int(routing_map[0].sum())
    capacity = math.ceil(tokens * topk / experts * factor)
    kept = torch.zeros_like(routing_map)
    for e in range(experts):
        chosen = [t for t in range(tokens) if routing_map[t, e]]
        if policy == "probs":
            chosen = sorted(chosen, key=lambda t: (-float(probs[t, e]), t))
        for t in chosen[:capacity]:
            kept[t, e] = True
    return kept


def _naive_moe(x, ref, kept_probs):
    """``sum_e p[t, e] * expert_e(x_t)`` with plain loops over the reference experts."""
    tokens = x.reshape(-1, x.size(-1))
    out = torch.zeros_like(tokens)
    for e, expert in enumerate(ref.experts.local_experts):
        rows = kept_probs[:, e].nonzero().flatten()
        if rows.numel():
            y, bias = expert(tokens[rows])
            y = y if bias is None else y + bias
            out[rows] += kept_probs[rows, e].unsqueeze(-1) * y
    return out.view_as(x)


def _capacity_case():
    one = single_rank_collection()
    xs, _ = _data()
    pgs = ps.initialize_model_parallel(expert_model_parallel_size=2)
    checked = 0
    for dispatcher, pad in (("allgather", False), ("alltoall", False), ("alltoall", True)):
        for policy in ("probs", "position"):
            fields = dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy=policy,
                          moe_router_load_balancing_type="none")
            torch.manual_seed(SEED)
            ref = MoELayer(make_config(**fields), pg_collection=one)
            torch.manual_seed(SEED)
            model = MoELayer(make_config(expert_model_parallel_size=2,
                                         moe_token_dispatcher_type=dispatcher,
                                         moe_pad_expert_input_to_capacity=pad, **fields))
            x = xs[pgs.rank("dp")]
            logits = x.reshape(-1, H) @ ref.router.weight.t()
            top = torch.topk(logits, 2, dim=-1)
            probs = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, -1))
            kept = _kept_by_formula(probs, probs > 0, 0.5, policy)
            assert (kept.sum(dim=0) <= 4).all()  # capacity = ceil(16 * 2 / 8 * 0.5) = 4
            y, _ = model(x)
            label = f"capacity {dispatcher} pad={pad} {policy}"
            torch.testing.assert_close(y, _naive_moe(x, ref, probs * kept), **TOL, msg=label)
            dropped = int((probs > 0).sum() - kept.sum())
            assert dropped > 0, label  # the case really drops tokens
            assert model.metrics.sums[-4].item() == dropped, label
            checked += 1
    return checked


def test_capacity_drops_the_tokens_the_formula_says():
    assert run_distributed(_capacity_case, 2, timeout=120) == [6, 6]
