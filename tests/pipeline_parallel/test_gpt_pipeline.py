"""GPTModel split over pipeline stages (x tensor parallel) equals the single-process model.

Every case builds GPTModel chunks for its (pp, vpp, tp) layout from one seed (weights do
not depend on the split: ``megacore.transformer.initialization``), runs one training
step with ``get_forward_backward_func()`` over several micro-batches, and compares the
per-micro-batch losses and every gradient (gathered over tp, keyed by global layer
number) with one process running the unsplit model on the same micro-batches.

Tied embeddings: the last stage's output weight is a copy of the first stage's word
embedding; the test's ``finalize_model_grads_func`` all-reduces their gradients over the
embedding group (and sequence-parallel gradients over tp), as
``megacore.distributed.finalize_model_grads`` does for DDP-wrapped chunks. After it, both
copies must hold the reference embedding gradient.

Zero bubble (``schedule="zb-h1"``): backwards split into B and W through the graph (the
tensor-parallel linear computes only its half in each), at pp 2 and 4, with tp 2 with
and without sequence parallelism. ZBV (``schedule="zbv"``, two chunks per rank in a V,
untied output layer): the loss and the output layer are on pipeline rank 0.

Tolerance (fp32): losses rtol 1e-5 / atol 1e-5, gradients rtol 1e-5 / atol 1e-6, as in
tests/models/test_gpt_model.py: tp splits sum matmuls in a different order; the pipeline
itself runs the same ops per micro-batch in the same order.
"""

import pytest
import torch
import torch.distributed as dist

from megacore import parallel_state as ps
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec
from megacore.pipeline_parallel import (
    TrainingHooks, get_forward_backward_func, get_layer_offset_and_count)
from megacore.pipeline_parallel.schedule_plan import stage_layout
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from tests.models.test_gpt_model import _logical, _unshard
from tests.multirank import run_distributed

VOCAB, SEQ, MBS = 51, 8, 2
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


def _config(case, tp, pp):
    vpp = case["vpp"] if case["vpp"] > 1 else None
    return TransformerConfig(
        num_layers=case["layers"], hidden_size=16, num_attention_heads=4, ffn_hidden_size=32,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
        sequence_parallel=case.get("sp", False) and tp > 1,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=case.get("first"),
        num_layers_in_last_pipeline_stage=case.get("last"),
        pipeline_schedule=case.get("schedule"))


def _batches(m):
    g = torch.Generator().manual_seed(7)
    return [{"tokens": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
             "labels": torch.randint(0, VOCAB, (MBS, SEQ), generator=g)} for _ in range(m)]


def _loss_func(loss):                     # loss [b, s] per token
    mean = loss.mean()
    return mean, {"lm loss": mean.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    positions = torch.arange(SEQ).expand(MBS, SEQ)
    output = model(batch["tokens"], positions, None, labels=batch["labels"])
    return output, _loss_func


def _finalize(models):
    """Sum tied-embedding grads over first+last stage; sequence-parallel grads over tp."""
    params = [p for m in models for p in m.parameters()]
    in_embd = ps.is_rank_in_embedding_group(ignore_virtual=True)
    if in_embd and dist.get_world_size(ps.get_embedding_group()) > 1:
        for p in params:
            if getattr(p, "shared_embedding", False):
                dist.all_reduce(p.grad, group=ps.get_embedding_group())
    if ps.get_tensor_model_parallel_world_size() > 1:
        for p in params:
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())


def _global_name(name, offset):
    if name.startswith("decoder.layers."):
        _, _, index, rest = name.split(".", 3)
        return f"decoder.layers.{int(index) + offset}.{rest}"
    return name


def _build_chunks(case, tp, pp):
    rank, vpp = ps.get_pipeline_model_parallel_rank(), case["vpp"]
    config = _config(case, tp, pp)
    layout = stage_layout(case.get("schedule"), pp, vpp)
    chunks, offsets = [], []
    for c in range(vpp):
        model_parallel_manual_seed(1234)
        chunks.append(GPTModel(
            config, get_gpt_layer_local_spec(), VOCAB, max_sequence_length=SEQ,
            pre_process=layout.is_first(rank, c), post_process=layout.is_last(rank, c),
            share_embeddings_and_output_weights=case.get("tied", False),
            vp_stage=c if vpp > 1 else None))
        offsets.append(get_layer_offset_and_count(
            case["layers"], pp, rank, vpp if vpp > 1 else None, c, case.get("first"),
            case.get("last"), v_shape=layout.v_shape)[0])
    return chunks, offsets


def _run_case(case, tp, pp):
    vpp = case["vpp"]
    ps.set_virtual_pipeline_model_parallel_world_size(vpp if vpp > 1 else None)
    ps.set_virtual_pipeline_model_parallel_rank(0 if vpp > 1 else None)
    chunks, offsets = _build_chunks(case, tp, pp)
    batches = _batches(case["m"])
    iters = [iter(batches) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iters if vpp > 1 else iters[0],
        model=chunks if vpp > 1 else chunks[0], num_microbatches=case["m"], seq_length=SEQ,
        micro_batch_size=MBS, hooks=TrainingHooks(finalize_model_grads_func=_finalize))
    group = ps.get_tensor_model_parallel_group()
    grads = {}
    for chunk, offset in zip(chunks, offsets):
        for name, p in chunk.named_parameters():
            grads[_global_name(name, offset)] = _logical(
                name, _unshard(p, p.grad, group), chunk.config, VOCAB)
    keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    return {"losses": [d["lm loss"] for d in losses], "grads": grads} if keep else None


def _run_cases(tp, pp, cases):
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return [_run_case(case, tp, pp) for case in cases]


def _reference(cases):
    ps.initialize_model_parallel()
    out = []
    for case in cases:
        config = _config(dict(case, vpp=1, first=None, last=None, schedule=None), 1, 1)
        model_parallel_manual_seed(1234)
        model = GPTModel(config, get_gpt_layer_local_spec(), VOCAB, max_sequence_length=SEQ,
                         share_embeddings_and_output_weights=case.get("tied", False))
        losses = []
        for batch in _batches(case["m"]):
            loss, _ = _loss_func(_forward_step(iter([batch]), model)[0])
            (loss / case["m"]).backward()
            losses.append(loss.detach())
        out.append({"losses": losses,
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
    return out


LAYOUTS = {  # (tp, pp) -> cases
    (1, 2): [dict(vpp=1, m=3, layers=4), dict(vpp=1, m=2, layers=4, tied=True),
             dict(vpp=2, m=4, layers=4, tied=True),
             dict(vpp=1, m=2, layers=4, first=1, last=3),
             dict(vpp=1, m=3, layers=4, tied=True, schedule="zb-h1"),
             dict(vpp=2, m=3, layers=4, schedule="zbv")],
    (2, 2): [dict(vpp=1, m=2, layers=2, tied=True, sp=True), dict(vpp=2, m=2, layers=4),
             dict(vpp=1, m=3, layers=2, tied=True, sp=True, schedule="zb-h1"),
             dict(vpp=2, m=4, layers=4, sp=True, schedule="zbv")],
    (1, 4): [dict(vpp=1, m=5, layers=4, tied=True), dict(vpp=2, m=4, layers=8),
             dict(vpp=1, m=2, layers=4, first=2, last=0, tied=True),
             dict(vpp=1, m=6, layers=4, tied=True, schedule="zb-h1"),
             dict(vpp=2, m=9, layers=8, schedule="zbv")],
    (2, 4): [dict(vpp=2, m=4, layers=8, tied=True, sp=True),
             dict(vpp=1, m=5, layers=4, schedule="zb-h1")],
}


def _compare(cases, ref, per_rank, pp):
    for i, case in enumerate(cases):
        results = [r[i] for r in per_rank if r[i] is not None]
        assert len(results) == pp, "one tp/dp rank-0 result per stage"
        # The loss stage: the last, or pipeline rank 0 under ZBV's V.
        losses = results[0 if case.get("schedule") == "zbv" else -1]["losses"]
        torch.testing.assert_close(losses, ref[i]["losses"], **LOSS_TOL)
        grads = {}
        for r in results:
            grads.update(r["grads"])
        expected = dict(ref[i]["grads"])
        if case.get("tied"):
            # The last stage's copy of the tied weight must carry the full embedding grad.
            expected["output_layer.weight"] = expected["embedding.word_embeddings.weight"]
        assert sorted(grads) == sorted(expected), case
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, **GRAD_TOL, msg=f"{case} {name}")


@pytest.mark.parametrize("tp, pp", list(LAYOUTS))
def test_gpt_pipeline_matches_single_process(tp, pp):
    cases = LAYOUTS[(tp, pp)]
    ref = run_distributed(_reference, 1, args=(cases,))[0]
    per_rank = run_distributed(_run_cases, tp * pp, args=(tp, pp, cases), timeout=240)
    _compare(cases, ref, per_rank, pp)


def test_zbv_refuses_tied_embeddings():
    # The tie would join chunks of pipeline rank 0, not the first and last rank.
    config = _config(dict(vpp=2, layers=4, schedule="zbv"), 1, 2)
    with pytest.raises(ValueError, match="--untie-embeddings-and-output-weights"):
        GPTModel(config, get_gpt_layer_local_spec(), VOCAB, max_sequence_length=SEQ,
                 share_embeddings_and_output_weights=True, vp_stage=0)
