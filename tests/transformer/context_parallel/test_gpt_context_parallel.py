"""GPTModel under context parallelism equals the single-process model.

Layouts: cp=2 (2 ranks), cp=2 x tp=2 with and without sequence parallelism (4 ranks), and
cp=2 x pp=2 through the 1F1B schedule with two micro-batches (4 ranks). Each run builds
the model from the same seed, feeds each rank its zigzag share of the batch (global
position ids, so learned positions and RoPE see global token indices) and trains on the
masked token mean over the full sequence (``masked_token_mean_over_cp``); gradients are
averaged over cp as DDP over dp x cp would. The parent compares the loss and every
parameter gradient, unsharded over tp and keyed by global layer number, with one
single-process run.

Cases: the GPT spec (LayerNorm, GeLU, biases, learned absolute positions, multi-head) and
the Llama spec (RMSNorm, SwiGLU, RoPE, grouped-query attention with 2 groups).

With attention dropout on and the opt-in ``layout_independent_attention_dropout``, cp=1
(DotProductAttention) and the ring draw the same keyed mask, so cp=2 and cp=2 x tp=2
agree with cp=1. Without dropout the ring runs on fused kernels (the default).
Without position ids, RoPE angles must still follow global positions.

Tolerance: fp32; rtol 1e-5 / atol 1e-5 on the loss (~4) and atol 1e-6 on gradients
(~1e-3): ring attention merges softmax blocks and the cp/tp reductions sum in another
order than one process; observed differences are ~1e-7 and ~1e-9.
"""

import pytest
import torch
import torch.distributed as dist

from megacore import parallel_state as ps
from megacore.models.gpt import (
    GPTModel,
    get_gpt_layer_local_spec,
    get_llama_layer_local_spec,
    llama_config_kwargs,
)
from megacore.pipeline_parallel import get_forward_backward_func
from megacore.tensor_parallel import all_gather_along_dim, model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from megacore.transformer.context_parallel import (
    get_batch_on_this_cp_rank,
    masked_token_mean_over_cp,
)
from tests.multirank import run_distributed

LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)
VOCAB, SEQ, BATCH, MICROBATCHES = 64, 16, 2, 2

CASES = {
    "gpt": dict(spec="gpt", cfg={}, model={}),
    "llama_gqa_rope": dict(spec="llama", cfg=llama_config_kwargs(num_query_groups=2),
                           model=dict(position_embedding_type="rope")),
    # Hidden dropout draws the full-sequence mask and keeps this rank's global positions,
    # so it is part of the contract under cp (attention dropout is checked separately).
    "hidden_dropout": dict(spec="gpt", cfg=dict(hidden_dropout=0.3), model={}),
}
# Dropout masks are drawn per stage in pipeline order, so pipelined runs compare without it.
PIPELINE_CASES = {name: case for name, case in CASES.items() if name != "hidden_dropout"}
DROPOUT_CASE = dict(spec="llama",
                    cfg=dict(llama_config_kwargs(num_query_groups=2), attention_dropout=0.2,
                             layout_independent_attention_dropout=True),
                    model=dict(position_embedding_type="rope"))


def _build(case, tp=1, cp=1, pp=1, sequence_parallel=False):
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
               hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
               context_parallel_size=cp, pipeline_model_parallel_size=pp,
               sequence_parallel=sequence_parallel)
    cfg.update(case["cfg"])
    config = TransformerConfig(**cfg)
    spec = get_gpt_layer_local_spec() if case["spec"] == "gpt" else get_llama_layer_local_spec()
    model_parallel_manual_seed(1234)
    return GPTModel(config, spec, VOCAB, max_sequence_length=SEQ,
                    pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage(), **case["model"])


def _microbatches():
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        loss_mask = (torch.rand(BATCH, SEQ, generator=g) > 0.3).float()
        batches.append({"tokens": tokens,
                        "labels": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
                        "loss_mask": loss_mask,
                        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous()})
    return batches


def _local(batch):
    return get_batch_on_this_cp_rank(batch, ps.get_context_parallel_world_size(),
                                     ps.get_context_parallel_rank())


def _loss(model, batch):
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return masked_token_mean_over_cp(losses, batch["loss_mask"], ps.get_context_parallel_group())


# -- gradients in the single-process layout -------------------------------------------------
def _unshard(param, grad):
    """tp shard -> full tensor (partition_stride-aware), in the tp=1 layout."""
    group = ps.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    if not getattr(param, "tensor_model_parallel", False) or world == 1:
        return grad
    dim, stride = param.partition_dim, param.partition_stride
    shards = all_gather_along_dim(grad.contiguous(), dim, group).chunk(world, dim=dim)
    blocks = [shards[r].chunk(stride, dim=dim)[k] for k in range(stride) for r in range(world)]
    return torch.cat(blocks, dim=dim)


def _global_grads(model):
    """Grads averaged over cp (DDP over dp x cp), summed over tp for sequence-parallel
    params, unsharded over tp, keyed by global layer number."""
    cp_group, cp = ps.get_context_parallel_group(), ps.get_context_parallel_world_size()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        dist.all_reduce(grad, group=cp_group)
        grad /= cp
        if getattr(param, "sequence_parallel", False):
            dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        grads[name] = _unshard(param, grad)
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        prefix = f"decoder.layers.{i}."
        out.update({f"layer{layer.layer_number}.{n[len(prefix):]}": g
                    for n, g in grads.items() if n.startswith(prefix)})
    out.update({n: g for n, g in grads.items() if not n.startswith("decoder.layers.")})
    return out


# -- runs ---------------------------------------------------------------------------------
def _run_direct(tp, cp, sequence_parallel):
    """No pipeline: call the model on each micro-batch, loss = mean over micro-batches."""
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    out = {}
    for name, case in CASES.items():
        model = _build(case, tp=tp, cp=cp, sequence_parallel=sequence_parallel)
        reported = []
        for batch in _microbatches():
            loss, value = _loss(model, _local(batch))
            (loss / MICROBATCHES).backward()
            reported.append(value)
        out[name] = dict(loss=torch.stack(reported).mean(), grads=_global_grads(model))
    out["dropout"] = _dropout_run(tp, cp, sequence_parallel)
    if cp > 1:
        out["rope_without_position_ids"] = _rope_without_position_ids()
    return out


def _rope_without_position_ids():
    """RoPE needs no position ids: GPTModel derives the global ones from the cp rank."""
    model = _build(CASES["llama_gqa_rope"], tp=ps.get_tensor_model_parallel_world_size(),
                   cp=ps.get_context_parallel_world_size())
    batch = _local(_microbatches()[0])
    with torch.no_grad():
        given = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        derived = model(batch["tokens"], None, None, labels=batch["labels"])
    return torch.equal(given, derived)


def _dropout_run(tp, cp, sequence_parallel):
    model = _build(DROPOUT_CASE, tp=tp, cp=cp, sequence_parallel=sequence_parallel)
    model_parallel_manual_seed(99)  # the dropout seeds: same draws on every layout
    batch = _local(_microbatches()[0])
    loss, value = _loss(model, batch)
    loss.backward()
    model.eval()  # dropout off: the same model must give a different loss
    with torch.no_grad():
        _, eval_value = _loss(model, batch)
    return dict(loss=value, grads=_global_grads(model), eval_loss=eval_value)


def _run_pipelined(cp):
    ps.initialize_model_parallel(pipeline_model_parallel_size=2, context_parallel_size=cp)
    out = {}
    for name, case in PIPELINE_CASES.items():
        model = _build(case, cp=cp, pp=2)

        def forward_step(data_iterator, model):
            batch = _local(next(data_iterator))
            output = model(batch["tokens"], batch["position_ids"], None,
                           labels=batch["labels"])
            if not ps.is_pipeline_last_stage():
                return output, None

            def loss_func(losses):
                loss, value = masked_token_mean_over_cp(losses, batch["loss_mask"],
                                                        ps.get_context_parallel_group())
                return loss, {"lm loss": value}

            return output, loss_func

        results = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(_microbatches()), model=model,
            num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=BATCH)
        loss = torch.stack([r["lm loss"] for r in results]).mean() if results else None
        out[name] = dict(loss=loss, grads=_global_grads(model))
    return out


def _merge_stages(results):
    """Per-rank results -> one dict per case (loss from the last stage, all grads)."""
    merged = {}
    for name in PIPELINE_CASES:
        grads, losses = {}, [r[name]["loss"] for r in results if r[name]["loss"] is not None]
        for r in results:
            grads.update(r[name]["grads"])
        merged[name] = dict(loss=losses[0], grads=grads)
    return merged


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_run_direct, 1, args=(1, 1, False))[0]


def _compare(ref, results, what, cases=tuple(CASES)):
    for rank, got in enumerate(results):
        for name in cases:
            label = f"{what} {name} rank {rank}"
            torch.testing.assert_close(got[name]["loss"], ref[name]["loss"], **LOSS_TOL,
                                       msg=lambda m: f"{label} loss: {m}")
            assert got[name]["grads"].keys() == ref[name]["grads"].keys(), label
            for param, grad in ref[name]["grads"].items():
                torch.testing.assert_close(got[name]["grads"][param], grad, **GRAD_TOL,
                                           msg=lambda m: f"{label} grad {param}: {m}")


@pytest.fixture(scope="module")
def cp2():
    return run_distributed(_run_direct, 2, args=(1, 2, False))


@pytest.fixture(scope="module")
def cp2_tp2():
    return run_distributed(_run_direct, 4, args=(2, 2, False))


def test_cp2_matches_single_process(reference, cp2):
    _compare(reference, cp2, "cp=2")


def test_cp2_tp2_matches_single_process(reference, cp2_tp2):
    _compare(reference, cp2_tp2, "cp=2 tp=2")


def test_cp2_tp2_sequence_parallel_matches_single_process(reference):
    _compare(reference, run_distributed(_run_direct, 4, args=(2, 2, True)), "cp=2 tp=2 sp")


def test_rope_positions_default_to_global_under_cp(cp2, cp2_tp2):
    assert all(r["rope_without_position_ids"] for r in cp2 + cp2_tp2)


def test_attention_dropout_is_layout_independent(reference, cp2, cp2_tp2):
    # Dropout is active: it changes the loss (by ~9e-4 on this near-uniform tiny model,
    # ~100x the comparison tolerance). cp=1 and the ring use the same keyed mask.
    for r in [reference] + cp2 + cp2_tp2:
        assert abs(float(r["dropout"]["loss"] - r["dropout"]["eval_loss"])) > 1e-4
    _compare({"dropout": reference["dropout"]}, cp2 + cp2_tp2, "attention dropout",
             cases=("dropout",))


def test_cp2_pp2_matches_single_process(reference):
    results = run_distributed(_run_pipelined, 4, args=(2,))
    # Order tp-cp-ep-dp-pp: rank = cp_rank + 2 * pp_rank; merge the two stages of each
    # cp rank into one model's worth of grads.
    merged = [_merge_stages([results[cp_rank], results[cp_rank + 2]]) for cp_rank in range(2)]
    _compare(reference, merged, "cp=2 pp=2", cases=tuple(PIPELINE_CASES))
