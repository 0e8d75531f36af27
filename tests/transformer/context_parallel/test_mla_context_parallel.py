"""A multi-latent-attention GPTModel under context parallelism equals the single process.

Layouts: cp=2 (2 ranks) and cp=2 x tp=2 with and without sequence parallelism (4 ranks).
The harness is the plain-attention one (``test_gpt_context_parallel``): same seed, each
rank gets its zigzag share of two micro-batches with global position ids, the loss is
the masked token mean over the whole sequence, gradients are averaged over cp (DDP over
dp x cp) and unsharded over tp; the parent compares the loss and every parameter
gradient with one single-process run.

Cases: queries through their own latent (``q_lora_rank``, DeepSeek-V3) and straight from
the hidden state (DeepSeek-V2-Lite), and the first with YaRN rope scaling (its angles,
cos/sin factor and softmax factor at each token's global position). The widths make the key head (qk 8 + rope 4 = 12)
wider than the value head (6), so the ring's value padding is exercised. Without
position ids, the decoupled RoPE must still use global positions: the loss equals the
one computed with them.

Tolerance: fp32, the plain-attention test's (rtol 1e-5 / atol 1e-5 on the loss,
rtol 1e-5 / atol 1e-6 on gradients): ring attention merges softmax blocks and the cp/tp
reductions sum in another order than one process.
"""

import torch

from megacore import parallel_state as ps
from megacore.models.gpt import GPTModel, get_gpt_decoder_block_spec
from megacore.tensor_parallel import model_parallel_manual_seed
from tests.multirank import run_distributed
from tests.transformer.context_parallel.test_gpt_context_parallel import (
    GRAD_TOL,
    LOSS_TOL,
    MICROBATCHES,
    SEQ,
    VOCAB,
    _global_grads,
    _local,
    _loss,
    _microbatches,
)
from tests.transformer.test_multi_latent_attention import YARN, mla_config

CASES = {"q_lora": {}, "no_q_lora": dict(q_lora_rank=None),
         "yarn": dict(rope_type="yarn", **YARN)}


def _build(case, tp, cp, sequence_parallel):
    config = mla_config(tensor_model_parallel_size=tp, context_parallel_size=cp,
                        sequence_parallel=sequence_parallel, **CASES[case])
    model_parallel_manual_seed(1234)
    return GPTModel(config, get_gpt_decoder_block_spec(config), vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)


def _run(tp, cp, sequence_parallel):
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    out = {}
    for case in CASES:
        model = _build(case, tp, cp, sequence_parallel)
        reported = []
        for batch in _microbatches():
            loss, value = _loss(model, _local(batch))
            (loss / MICROBATCHES).backward()
            reported.append(value)
        batch = _local(_microbatches()[0])
        with torch.no_grad():  # positions derived by GPTModel from the cp rank
            _, implicit = _loss(model, dict(batch, position_ids=None))
            _, explicit = _loss(model, batch)
        out[case] = dict(loss=torch.stack(reported).mean(), grads=_global_grads(model),
                         implicit_positions=(implicit, explicit))
    return out


def _compare(ref, results, what):
    for rank, got in enumerate(results):
        for case in CASES:
            label = f"{what} {case} rank {rank}"
            torch.testing.assert_close(got[case]["loss"], ref[case]["loss"], **LOSS_TOL,
                                       msg=lambda m: f"{label} loss: {m}")
            torch.testing.assert_close(*got[case]["implicit_positions"], rtol=0, atol=0,
                                       msg=lambda m: f"{label} rope positions: {m}")
            assert got[case]["grads"].keys() == ref[case]["grads"].keys(), label
            for param, grad in ref[case]["grads"].items():
                torch.testing.assert_close(got[case]["grads"][param], grad, **GRAD_TOL,
                                           msg=lambda m: f"{label} grad {param}: {m}")


def test_mla_context_parallel_matches_single_process():
    ref = run_distributed(_run, 1, args=(1, 1, False))[0]
    assert ref["q_lora"]["grads"]["layer1.self_attention.linear_kv_up_proj.weight"].abs().sum() > 0
    _compare(ref, run_distributed(_run, 2, args=(1, 2, False)), "cp=2")
    _compare(ref, run_distributed(_run, 4, args=(2, 2, False)), "cp=2 tp=2")
    _compare(ref, run_distributed(_run, 4, args=(2, 2, True)), "cp=2 tp=2 sp")
