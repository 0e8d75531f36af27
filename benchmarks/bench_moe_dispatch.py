"""Throughput of an MoE layer (route + dispatch + experts + combine) vs a dense MLP.

For each layout (ep=1 on one rank, ep=2 on two ranks, gloo on CPU) and each token dispatcher,
times forward and forward+backward of ``MoELayer`` on ``[s, b, h]`` tokens per rank and
reports tokens/s summed over ranks. The dense baseline is an ``MLP`` with the same *active*
parameters per token: width ``topk * moe_ffn_hidden_size`` (data parallel at 2 ranks, so it
does no communication in the timed region).

Usage::

    python benchmarks/bench_moe_dispatch.py [--seq 256 --batch 4 --hidden 256 --ffn 512
                                             --experts 8 --topk 2 --iters 5 --json out.json]

Ranks are forked and meet through a FileStore (see ``shared/CPU_NOTES.md``); each uses one
thread. Timings on shared CPUs swing a lot: compare rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore import parallel_state as ps
from megacore.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megacore.transformer.mlp import MLP, MLPSubmodules
from megacore.transformer.moe import MoELayer
from megacore.transformer.transformer_config import TransformerConfig


def _config(args, **fields) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=1,
                   ffn_hidden_size=args.ffn, num_moe_experts=args.experts,
                   moe_router_topk=args.topk, hidden_dropout=0.0, attention_dropout=0.0,
                   activation_func=F.gelu, **fields)


def _time(module, x, iters, backward):
    def step():
        y, _ = module(x)
        if backward:
            y.sum().backward()

    for _ in range(2):  # warm-up
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    dist.barrier()
    return (time.perf_counter() - start) / iters


def _rank_main(rank, world, init_file, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    ps.initialize_model_parallel(expert_model_parallel_size=world)
    torch.manual_seed(0)
    x = torch.randn(args.seq, args.batch, args.hidden, requires_grad=True)
    tokens = args.seq * args.batch * world
    modules = {f"moe {d}": MoELayer(_config(args, expert_model_parallel_size=world,
                                            moe_token_dispatcher_type=d))
               for d in ("allgather", "alltoall")}
    modules["moe alltoall grouped"] = MoELayer(_config(
        args, expert_model_parallel_size=world, moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=True))
    modules["dense MLP (same active params)"] = MLP(
        _config(args), MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                     linear_fc2=RowParallelLinear),
        ffn_hidden_size=args.topk * args.ffn)
    rows = []
    for name, module in modules.items():
        fwd = _time(module, x, args.iters, backward=False)
        fwd_bwd = _time(module, x, args.iters, backward=True)
        rows.append(dict(layout=f"ep={world}", module=name, fwd_tokens_per_s=tokens / fwd,
                         fwd_bwd_tokens_per_s=tokens / fwd_bwd))
    if rank == 0:
        queue.put(rows)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _launch(world, args):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, world, init_file, args, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        rows = queue.get(timeout=600)
        for p in procs:
            p.join(timeout=60)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512, help="width of each expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # before forking: children must not inherit a thread pool
    rows = _launch(1, args) + _launch(2, args)
    print(f"tokens per rank: {args.seq * args.batch}, h={args.hidden}, experts={args.experts} "
          f"x ffn {args.ffn}, top-{args.topk}")
    print(f"{'layout':<7}{'module':<33}{'fwd tok/s':>12}{'fwd+bwd tok/s':>15}")
    for row in rows:
        print(f"{row['layout']:<7}{row['module']:<33}{row['fwd_tokens_per_s']:>12.0f}"
              f"{row['fwd_bwd_tokens_per_s']:>15.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
