"""Multi-token prediction under pipeline parallelism equals the single-process model.

The MTP depths run on the last stage, which keeps its own copy of the word embedding
(``GPTModel.mtp_process``). Each case builds the chunks of its (pp, vpp, tp) layout from
one seed, runs one training step with ``get_forward_backward_func()`` and the real
``finalize_model_grads`` (which sums the two embedding copies' gradients over the
embedding group), and compares with one process running the unsplit model:

* the main loss and each MTP depth's loss, per micro-batch;
* every gradient, gathered over tp and keyed by global layer number; *both* copies of the
  word embedding must hold the reference embedding gradient (main path + MTP path);
* the global grad norm as the optimizer computes it (``clip_grads.GradStatsContext``: the
  last stage's copy is not counted twice).

Tolerance (fp32): as tests/pipeline_parallel/test_gpt_pipeline.py (losses rtol/atol 1e-5,
gradients rtol 1e-5 / atol 1e-6): tp splits sum matmuls in another order, the pipeline
runs the same ops per micro-batch; the embedding gradient is one sum of two partial sums.
"""

import functools
import math

import pytest
import torch
import torch.distributed as dist

from megacore import parallel_state as ps
from megacore.distributed import finalize_model_grads
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec
from megacore.optimizer.clip_grads import GradStatsContext, local_grad_norm_squared
from megacore.pipeline_parallel import get_forward_backward_func, get_layer_offset_and_count
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from megacore.transformer.moe import set_moe_aux_loss_scale
from tests.models.test_gpt_model import _logical, _unshard
from tests.multirank import run_distributed
from tests.pipeline_parallel.test_gpt_pipeline import _global_name

VOCAB, SEQ, MBS = 51, 8, 2
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)
EMBEDDING = "embedding.word_embeddings.weight"
COPY = "last_stage_copy." + EMBEDDING


def _config(case, tp, pp):
    vpp = case["vpp"] if case["vpp"] > 1 else None
    return TransformerConfig(
        num_layers=case["layers"], hidden_size=16, num_attention_heads=4, ffn_hidden_size=32,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
        sequence_parallel=case.get("sp", False) and tp > 1,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        mtp_num_layers=case["mtp"], mtp_loss_scaling_factor=0.5,
        finalize_model_grads_func=finalize_model_grads)


def _model(config, case, pre_process=True, post_process=True, vp_stage=None):
    model_parallel_manual_seed(1234)
    return GPTModel(config, get_gpt_layer_local_spec(), VOCAB, max_sequence_length=SEQ,
                    pre_process=pre_process, post_process=post_process,
                    share_embeddings_and_output_weights=case.get("tied", False),
                    position_embedding_type="rope", vp_stage=vp_stage)


def _batches(m):
    g = torch.Generator().manual_seed(7)
    return [{"tokens": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
             "labels": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
             "mask": (torch.rand(MBS, SEQ, generator=g) > 0.25).float()} for _ in range(m)]


def _loss_func(mask, mtp_losses, loss):  # loss [b, s] per token
    mean = (loss * mask).sum() / mask.sum()
    report = {"lm loss": mean.detach().clone()}
    report.update({f"mtp_{k} loss": v for k, v in enumerate(mtp_losses, start=1)})
    return mean, report


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    positions = torch.arange(SEQ).expand(MBS, SEQ)
    output = model(batch["tokens"], positions, None, labels=batch["labels"],
                   loss_mask=batch["mask"])
    mtp_losses = list(model.mtp.last_losses) if model.mtp is not None else []
    return output, functools.partial(_loss_func, batch["mask"], mtp_losses)


def _build_chunks(case, tp, pp):
    rank, vpp = ps.get_pipeline_model_parallel_rank(), case["vpp"]
    config = _config(case, tp, pp)
    chunks, offsets = [], []
    for c in range(vpp):
        chunks.append(_model(config, case, pre_process=(rank == 0 and c == 0),
                             post_process=(rank == pp - 1 and c == vpp - 1),
                             vp_stage=c if vpp > 1 else None))
        offsets.append(get_layer_offset_and_count(case["layers"], pp, rank,
                                                  vpp if vpp > 1 else None, c)[0])
    return chunks, offsets


def _grad_norm(chunks, pp_first):
    context = GradStatsContext(tp_rank=ps.get_tensor_model_parallel_rank(),
                               is_first_pipeline_stage=pp_first)
    pairs = [(p.grad, p) for chunk in chunks for p in chunk.parameters()]
    total = local_grad_norm_squared(pairs, context, torch.device("cpu"))
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return math.sqrt(total.item())


def _gathered(chunks, offsets, pp_first):
    group, grads = ps.get_tensor_model_parallel_group(), {}
    for index, (chunk, offset) in enumerate(zip(chunks, offsets)):
        for name, p in chunk.named_parameters():
            key = _global_name(name, offset)
            if key == EMBEDDING and not (pp_first and index == 0):
                key = COPY  # the last stage's copy, kept apart from stage 0's table
            grads[key] = _logical(name, _unshard(p, p.grad, group), chunk.config, VOCAB)
    return grads


def _run_case(case, tp, pp):
    vpp = case["vpp"]
    ps.set_virtual_pipeline_model_parallel_world_size(vpp if vpp > 1 else None)
    ps.set_virtual_pipeline_model_parallel_rank(0 if vpp > 1 else None)
    chunks, offsets = _build_chunks(case, tp, pp)
    set_moe_aux_loss_scale(chunks, 1.0 / case["m"])  # as training does: 1 / micro-batches
    iters = [iter(_batches(case["m"])) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iters if vpp > 1 else iters[0],
        model=chunks if vpp > 1 else chunks[0], num_microbatches=case["m"], seq_length=SEQ,
        micro_batch_size=MBS)
    pp_first = ps.get_pipeline_model_parallel_rank() == 0
    norm = _grad_norm(chunks, pp_first)
    grads = _gathered(chunks, offsets, pp_first)
    keep = ps.get_tensor_model_parallel_rank() == 0
    return {"losses": losses, "grads": grads, "norm": norm} if keep else None


def _run_cases(tp, pp, cases):
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return [_run_case(case, tp, pp) for case in cases]


def _reference(cases):
    ps.initialize_model_parallel()
    out = []
    for case in cases:
        model = _model(_config(dict(case, vpp=1), 1, 1), case)
        set_moe_aux_loss_scale(model, 1.0 / case["m"])
        losses = []
        for batch in _batches(case["m"]):
            output, loss_func = _forward_step(iter([batch]), model)
            loss, report = loss_func(output)
            (loss / case["m"]).backward()
            losses.append(report)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values()))
        out.append({"losses": losses, "grads": grads, "norm": norm})
    return out


LAYOUTS = {  # (tp, pp) -> cases
    (1, 2): [dict(vpp=1, m=3, layers=2, mtp=1), dict(vpp=1, m=2, layers=2, mtp=2, tied=True),
             dict(vpp=2, m=4, layers=4, mtp=1, tied=True)],
    (2, 2): [dict(vpp=1, m=2, layers=2, mtp=1), dict(vpp=1, m=2, layers=2, mtp=1, tied=True,
                                                     sp=True),
             dict(vpp=1, m=2, layers=2, mtp=2, sp=True)],
}


def _compare(cases, ref, per_rank, pp):
    for i, case in enumerate(cases):
        results = [r[i] for r in per_rank if r[i] is not None]
        assert len(results) == pp, "one tp rank-0 result per stage"
        losses = results[-1]["losses"]
        assert [sorted(d) for d in losses] == [sorted(d) for d in ref[i]["losses"]]
        assert f"mtp_{case['mtp']} loss" in losses[0], case
        for got, want in zip(losses, ref[i]["losses"]):
            for key in want:  # main and every MTP depth, separately
                torch.testing.assert_close(got[key], want[key], **LOSS_TOL, msg=f"{case} {key}")
        grads = {}
        for r in results:
            grads.update(r["grads"])
        expected = dict(ref[i]["grads"], **{COPY: ref[i]["grads"][EMBEDDING]})
        assert sorted(grads) == sorted(expected), case
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, **GRAD_TOL, msg=f"{case} {name}")
        for r in results:  # every stage computed the same global norm
            assert r["norm"] == pytest.approx(ref[i]["norm"], rel=1e-5), case


@pytest.mark.parametrize("tp, pp", list(LAYOUTS))
def test_mtp_pipeline_matches_single_process(tp, pp):
    cases = LAYOUTS[(tp, pp)]
    ref = run_distributed(_reference, 1, args=(cases,))[0]
    per_rank = run_distributed(_run_cases, tp * pp, args=(tp, pp, cases), timeout=240)
    _compare(cases, ref, per_rank, pp)


def _refuse_learned_absolute():
    ps.initialize_model_parallel(pipeline_model_parallel_size=2)
    config = _config(dict(vpp=1, layers=2, mtp=1), 1, 2)
    first = ps.get_pipeline_model_parallel_rank() == 0
    with pytest.raises(ValueError, match="--mtp-num-layers with --pipeline-model-parallel-"
                                         "size > 1 needs --position-embedding-type rope"):
        GPTModel(config, get_gpt_layer_local_spec(), VOCAB, max_sequence_length=SEQ,
                 pre_process=first, post_process=not first)


def test_mtp_pipeline_refuses_learned_absolute_positions_on_every_stage():
    run_distributed(_refuse_learned_absolute, 2)
