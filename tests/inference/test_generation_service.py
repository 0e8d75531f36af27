"""GenerationService on 4 ranks (tp=2 x pp=2): rank 0 queues and batches, the others follow.

Rank 0 submits jobs from several threads at once (one with a token callback) while the
other ranks sit in ``follow_requests``; idle heartbeats are exercised with a short
interval. Each job's results must equal a direct ``generate`` call of the same requests
on all ranks (same layout, so tokens are identical; log probs within fp32 rounding of
the different batch shapes, atol 1e-4 as in test_generation_layouts).
"""

import concurrent.futures
import time

import torch
import torch.distributed as dist

from megacore import parallel_state as ps
from megacore.inference import GenerationRequest, InferenceConfig, SamplingParams
from megacore.inference import TextGenerationController
from megacore.inference.generation_service import (
    GenerationService,
    ServiceConfig,
    follow_requests,
)
from tests.inference.tiny_model import build_chunks
from tests.multirank import run_distributed


def _jobs():
    g = torch.Generator().manual_seed(2)
    jobs = []
    for j in range(6):
        prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (2 + j, 7 - j)]
        sampling = SamplingParams(temperature=0.0) if j % 2 else SamplingParams(seed=j)
        jobs.append([GenerationRequest(p, 6 + j, sampling) for p in prompts[: 1 + j % 2]])
    return jobs


def _serve_and_follow():
    ps.initialize_model_parallel(2, 2)
    controller = TextGenerationController(build_chunks("gpt", vocab=61, max_seq=32),
                                          InferenceConfig(max_batch_size=4))
    jobs = _jobs()
    served, streamed, batches = None, [], None
    if dist.get_rank() == 0:
        service = GenerationService(controller, ServiceConfig(batch_wait_s=0.01,
                                                              heartbeat_s=0.05)).start()
        time.sleep(0.3)  # idle: heartbeats go out
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(lambda i=i: service.submit(
                jobs[i], (lambda r, t, lp: streamed.append((r, t))) if i == 0 else None
            ).result(timeout=120)) for i in range(len(jobs))]
            served = [f.result() for f in futures]
        service.stop()
        batches = service.batches_run
    else:
        batches = follow_requests(controller)
    direct = [controller.generate(job) for job in jobs]
    ps.destroy_model_parallel()

    def summary(results):
        return [(r.generated_tokens, r.generated_logprobs) for r in results]

    return {"batches": batches, "direct": [summary(d) for d in direct],
            "served": served and [summary(s) for s in served], "streamed": streamed}


def test_rank0_batches_and_the_other_ranks_follow():
    results = run_distributed(_serve_and_follow, world_size=4, timeout=240)
    rank0 = results[0]
    assert all(r["batches"] == rank0["batches"] for r in results)  # every rank ran each batch
    assert rank0["batches"] < len(_jobs())  # concurrent jobs shared batches
    for served, direct in zip(rank0["served"], rank0["direct"]):
        for (tokens, lps), (want_tokens, want_lps) in zip(served, direct):
            assert tokens == want_tokens
            torch.testing.assert_close(lps, want_lps, rtol=0, atol=1e-4)
    assert [t for _, t in rank0["streamed"]] == rank0["direct"][0][0][0]
