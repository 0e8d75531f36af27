"""FSDP2 (``fully_shard_model``) composed with tp / sp / pp / ep equals the single process.

Each case builds a GPTModel for its layout from one seed, shards it with
``fully_shard_model`` over the dp (x cp) group (experts over the expert-dp group), runs
one step of ``get_forward_backward_func()`` over ``m`` micro-batches per dp rank, and
compares the losses, every gradient (DTensor shards gathered over dp, then tp shards
gathered as in tests/models/test_gpt_model.py) and the global grad norm computed from the
local shards (``local_grad_norm_squared``, the optimizer's rule) with one process running
all ``dp x m`` micro-batches. It also checks that parameters really are sharded.

Layouts: dp 2 (ZeRO-3, ZeRO-2, and bf16 compute over fp32 master weights: looser
tolerance, see ``_check_bf16``), dp 4, tp 2 + sequence parallelism x dp 2, pp 2 x dp 2
(tied embeddings over the stages), MoE at ep 2 x dp 4 (experts sharded over expert-dp 2).

The schedule runs with ``build_training_hooks(model)``: ``finalize_model_grads`` and
FSDP2's no-sync for all but the last micro-batch. Each rank counts the collectives FSDP2
issues during the step (``torch.distributed.reduce_scatter_single`` and
``all_gather_single`` wrapped in the rank): one gradient reduce-scatter per FSDP2 unit
per step, whatever the micro-batch count, and under ZeRO-2 one parameter all-gather per
unit per step. A control case runs without the no-sync hook and counts one of each per
unit per micro-batch, so the count can tell the two apart.

Tolerance (fp32): losses rtol 1e-5 / atol 1e-5, grads rtol 1e-5 / atol 1e-6, as for the
other layouts (sums over dp and tp in another order); FSDP2 averages gradients with the
same 1/dp as DDP.
"""

import collections
import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from megacore import parallel_state as ps
from megacore.distributed import build_training_hooks, fully_shard_model
from megacore.pipeline_parallel import TrainingHooks
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec
from megacore.optimizer.clip_grads import GradStatsContext, local_grad_norm_squared
from megacore.pipeline_parallel import get_forward_backward_func, get_layer_offset_and_count
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from megacore.transformer.moe import is_moe_layer
from megacore.transformer.transformer_block import TransformerBlockSubmodules
from tests.models.test_gpt_model import _logical, _unshard
from tests.multirank import run_distributed

VOCAB, SEQ, MBS = 32, 8, 2
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


def _config(case, parallel=True):
    moe = case.get("moe", False)
    return TransformerConfig(
        num_layers=case.get("layers", 2), hidden_size=16, num_attention_heads=4,
        ffn_hidden_size=32, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=case.get("tp", 1) if parallel else 1,
        sequence_parallel=case.get("sp", False) and parallel,
        pipeline_model_parallel_size=case.get("pp", 1) if parallel else 1,
        expert_model_parallel_size=case.get("ep", 1) if parallel else 1,
        num_moe_experts=4 if moe else None, moe_router_topk=2 if moe else 2,
        moe_layer_freq=[1, 0] if moe else 1,
        moe_router_load_balancing_type="none" if moe else "aux_loss",
        moe_token_dispatcher_type="alltoall")


def _spec(cfg):
    if not cfg.num_moe_experts:
        return get_gpt_layer_local_spec()
    moe, dense = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts), \
        get_gpt_layer_local_spec()
    return TransformerBlockSubmodules(
        layer_specs=[moe if is_moe_layer(cfg, n) else dense
                     for n in range(1, cfg.num_layers + 1)],
        layer_norm=dense.submodules.input_layernorm)


def _batches(count):
    g = torch.Generator().manual_seed(11)
    return [{"tokens": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
             "labels": torch.randint(0, VOCAB, (MBS, SEQ), generator=g)} for _ in range(count)]


def _loss_func(loss):
    mean = loss.mean()
    return mean, {"lm loss": mean.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], torch.arange(SEQ).expand(MBS, SEQ), None,
                   labels=batch["labels"])
    return output, _loss_func


@contextlib.contextmanager
def _counting_collectives(names=("reduce_scatter_single", "all_gather_single")):
    """Count calls of ``torch.distributed.<name>`` in this rank (FSDP2 calls them through
    the module, so replacing the attribute sees every call)."""
    counts, originals = collections.Counter(), {name: getattr(dist, name) for name in names}

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in names:
        setattr(dist, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _units_with_params(model):
    """FSDP2 units (one parameter group each) that manage at least one parameter."""
    count = 0
    for unit in model.modules():
        if not isinstance(unit, FSDPModule):
            continue
        nested = {id(p) for sub in unit.modules() if sub is not unit and isinstance(sub, FSDPModule)
                  for p in sub.parameters()}
        count += any(id(p) not in nested for p in unit.parameters())
    return count


def _hooks(model, case):
    hooks = build_training_hooks(model)
    if case.get("sync_every_microbatch"):  # control: reduce-scatter after every micro-batch
        hooks = TrainingHooks(finalize_model_grads_func=hooks.finalize_model_grads_func)
    return hooks


def _run_case(case):
    tp, pp, ep = case.get("tp", 1), case.get("pp", 1), case.get("ep", 1)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)
    cfg = _config(case)
    rank = ps.get_pipeline_model_parallel_rank()
    model_parallel_manual_seed(1234)
    model = GPTModel(cfg, _spec(cfg), VOCAB, max_sequence_length=SEQ,
                     pre_process=rank == 0, post_process=rank == pp - 1,
                     share_embeddings_and_output_weights=case.get("tied", False))
    offset = get_layer_offset_and_count(cfg.num_layers, pp, rank, None, 0, None, None)[0]
    bf16 = case.get("bf16", False)
    fully_shard_model(model, reshard_after_forward=case.get("reshard", True),
                      param_dtype=torch.bfloat16 if bf16 else None,
                      reduce_dtype=torch.float32 if bf16 else None)
    compute_dtypes = []
    model.decoder.layers[0].register_forward_pre_hook(
        lambda module, args: compute_dtypes.append(module.self_attention.linear_qkv.weight.dtype))
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    smaller = any(p.to_local().numel() < p.numel() for p in model.parameters())
    m, dp = case["m"], ps.get_data_parallel_world_size()
    batches = _batches(m * dp)[ps.get_data_parallel_rank() * m:][:m]
    with _counting_collectives() as counts:
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=m, seq_length=SEQ, micro_batch_size=MBS, hooks=_hooks(model, case))
    context = GradStatsContext(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        expert_tp_rank=ps.get_expert_tensor_parallel_rank(),
        is_first_pipeline_stage=ps.is_pipeline_first_stage(ignore_virtual=True))
    norm_sq = local_grad_norm_squared([(p.grad, p) for p in model.parameters()], context,
                                      torch.device("cpu"))
    dist.all_reduce(norm_sq)
    grads = {}
    for name, p in model.named_parameters():
        full = p.grad.full_tensor()   # gathered over the FSDP mesh (dp, or expert dp)
        group = ps.get_expert_tensor_parallel_group() if not getattr(p, "allreduce", True) \
            else ps.get_tensor_model_parallel_group()
        grads[_global_name(name, offset, case)] = _logical(name, _unshard(p, full, group), cfg,
                                                           VOCAB)
    losses = [d["lm loss"] for d in losses]
    if losses:
        # Mean over dp of each micro-batch position: compare the flat list instead.
        gathered = [None] * dp
        dist.all_gather_object(gathered, losses, group=ps.get_data_parallel_group())
        losses = [x for rank_losses in gathered for x in rank_losses]
    ps.destroy_model_parallel()
    return {"losses": losses, "grads": grads, "norm": float(norm_sq.sqrt()),
            "sharded": sharded, "smaller": smaller, "compute_dtype": compute_dtypes[0],
            "master_dtypes": {p.dtype for p in model.parameters()},
            "grad_dtypes": {p.grad.dtype for p in model.parameters()},
            "reduce_scatters": counts["reduce_scatter_single"],
            "all_gathers": counts["all_gather_single"], "units": _units_with_params(model)}


def _global_name(name, offset, case):
    if name.startswith("decoder.layers."):
        _, _, index, rest = name.split(".", 3)
        name = f"decoder.layers.{int(index) + offset}.{rest}"
    if case.get("ep", 1) > 1 and ".experts.local_experts." in name:
        # Local expert e on ep rank r is global expert r * local + e.
        head, rest = name.split(".experts.local_experts.", 1)
        index, tail = rest.split(".", 1)
        local = 4 // case["ep"]
        name = f"{head}.experts.local_experts.{ps_ep_rank_cached() * local + int(index)}.{tail}"
    return name


def ps_ep_rank_cached():
    return ps.get_expert_model_parallel_rank()


def _run_cases(cases):
    return [_run_case(case) for case in cases]


def _reference(cases):
    ps.initialize_model_parallel()
    out = []
    for case in cases:
        cfg = _config(case, parallel=False)
        model_parallel_manual_seed(1234)
        model = GPTModel(cfg, _spec(cfg), VOCAB, max_sequence_length=SEQ,
                         share_embeddings_and_output_weights=case.get("tied", False))
        total = case["m"] * case["dp"]
        losses = []
        for batch in _batches(total):
            loss, _ = _loss_func(_forward_step(iter([batch]), model)[0])
            (loss / total).backward()
            losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))
        out.append({"losses": losses, "grads": grads, "norm": float(norm)})
    ps.destroy_model_parallel()
    return out


def _compare(cases, per_rank):
    ref = run_distributed(_reference, 1, args=(cases,))[0]
    for i, case in enumerate(cases):
        results = [r[i] for r in per_rank]
        assert all(r["sharded"] and r["smaller"] for r in results), case
        _check_collective_counts(case, results)
        losses = next(r["losses"] for r in results if r["losses"])
        if case.get("bf16"):
            _check_bf16(results, losses, ref[i])
            continue
        assert all(r["compute_dtype"] == torch.float32 for r in results)
        torch.testing.assert_close(losses, ref[i]["losses"], **LOSS_TOL, msg=str(case))
        grads = {}
        for r in results:
            grads.update(r["grads"])
        expected = dict(ref[i]["grads"])
        if case.get("tied") and case.get("pp", 1) > 1:
            expected["output_layer.weight"] = expected["embedding.word_embeddings.weight"]
        assert sorted(grads) == sorted(expected), case
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, **GRAD_TOL, msg=f"{case} {name}")
        for r in results:
            assert abs(r["norm"] - ref[i]["norm"]) <= 1e-5 * ref[i]["norm"], (case, r["norm"])


def _check_collective_counts(case, results):
    per_step = case["m"] if case.get("sync_every_microbatch") else 1
    for r in results:
        assert r["units"] > 0
        assert r["reduce_scatters"] == per_step * r["units"], (case, r["reduce_scatters"])
        if case.get("reshard") is False:  # ZeRO-2: gathered once, kept over micro-batches
            assert r["all_gathers"] == per_step * r["units"], (case, r["all_gathers"])


def _check_bf16(results, losses, ref):
    """bf16 compute over fp32 master weights, grads reduced and kept in fp32. Tolerance:
    bf16 has 8 mantissa bits (relative step 2^-8 = 0.4%); the loss of a tiny model ~3.5
    moves by ~1e-3 relative, gradients by a few percent: loss rtol 1e-2, norm 5%."""
    for r in results:
        assert r["compute_dtype"] == torch.bfloat16
        assert r["master_dtypes"] == {torch.float32} and r["grad_dtypes"] == {torch.float32}
        assert abs(r["norm"] - ref["norm"]) <= 0.05 * ref["norm"], (r["norm"], ref["norm"])
    torch.testing.assert_close(losses, ref["losses"], rtol=1e-2, atol=0)


CASES_2 = [dict(dp=2, m=2), dict(dp=2, m=3, reshard=False, tied=True),
           dict(dp=2, m=2, bf16=True),
           dict(dp=2, m=2, reshard=False, sync_every_microbatch=True)]
# MoE at dp 4 x ep 2: experts shard over expert-dp 2 (and divide by dp 4, not 2).
CASES_4 = [dict(dp=4, m=1, tied=True), dict(dp=2, m=2, tp=2, sp=True),
           dict(dp=2, m=3, pp=2, layers=4, tied=True), dict(dp=4, m=1, moe=True, ep=2)]


def test_fsdp2_matches_single_process_on_2_ranks():
    _compare(CASES_2, run_distributed(_run_cases, 2, args=(CASES_2,), timeout=180))


def test_fsdp2_composed_with_tp_pp_matches_single_process_on_4_ranks():
    _compare(CASES_4, run_distributed(_run_cases, 4, args=(CASES_4,), timeout=240))
