"""Generation in every tp/pp/vpp layout equals the single-process model.

Four gloo ranks run each layout in turn (tp=1/pp=1 with dp=4 is the single-process
reference: every rank holds the whole model), for a GPT model (learned positions, tied
embeddings across stages) and a Llama model (RoPE, grouped-query attention with
replicated key/value heads at tp=4). The batch mixes prompt lengths, greedy and seeded
sampling, prompt log probabilities and top log probabilities; the KV cache and the
recomputing path are both checked.

Every rank must return the same results (the last stage's choices are broadcast to all
stages), and every layout the reference's tokens exactly. Log probabilities: fp32,
atol 1e-4 — tp splits sum matmuls in another order, and with the large init std of the
tiny model the logits reach magnitudes ~10-30 (fp32 ulp ~2e-6); observed differences
are up to ~2e-5.
"""

import torch

from megacore import parallel_state as ps
from megacore.inference import GenerationRequest, InferenceConfig, SamplingParams
from megacore.inference import TextGenerationController
from tests.inference.tiny_model import build_chunks
from tests.multirank import run_distributed

LP_TOL = dict(rtol=0, atol=1e-4)
REFERENCE = (1, 1, None)
LAYOUTS = [REFERENCE, (2, 1, None), (1, 2, None), (2, 2, None), (4, 1, None), (1, 4, None),
           (1, 2, 2)]


def _requests():
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (6, 2, 9)]
    return [
        GenerationRequest(prompts[0], 8, SamplingParams(temperature=0.0),
                          return_prompt_logprobs=True, top_logprobs=2),
        GenerationRequest(prompts[1], 10, SamplingParams(temperature=0.8, top_k=30, seed=17)),
        GenerationRequest(prompts[2], 5, SamplingParams(temperature=1.0, top_p=0.9, seed=3),
                          return_prompt_logprobs=True),
    ]


def _summary(results):
    return [(r.generated_tokens, r.generated_logprobs, r.prompt_logprobs,
             r.generated_top_logprobs) for r in results]


def _generate_in_layouts(kind):
    out = {}
    for tp, pp, vpp in LAYOUTS:
        ps.initialize_model_parallel(tp, pp, vpp)
        chunks = build_chunks(kind, vocab=61, max_seq=32)
        for cache in (True, False) if (tp, pp) in ((1, 1), (2, 2)) else (True,):
            controller = TextGenerationController(
                chunks, InferenceConfig(max_batch_size=4, use_kv_cache=cache))
            out[(tp, pp, vpp, cache)] = _summary(controller.generate(_requests()))
        ps.destroy_model_parallel()
    return out


def _check(per_rank):
    for rank_results in per_rank[1:]:  # all ranks agree, bit for bit
        assert rank_results == per_rank[0]
    results = per_rank[0]
    reference = results[REFERENCE + (True,)]
    for layout, rows in results.items():
        for got, want in zip(rows, reference):
            assert got[0] == want[0], f"layout {layout}: tokens differ"
            torch.testing.assert_close(got[1], want[1], **LP_TOL)
            if want[2] is not None:
                torch.testing.assert_close(got[2], want[2], **LP_TOL)
            if want[3] is not None:
                assert [list(t) for t in got[3]] == [list(t) for t in want[3]]


def test_gpt_generation_is_the_same_in_every_layout():
    _check(run_distributed(_generate_in_layouts, world_size=4, args=("gpt",), timeout=240))


def test_llama_generation_is_the_same_in_every_layout():
    _check(run_distributed(_generate_in_layouts, world_size=4, args=("llama",), timeout=240))
