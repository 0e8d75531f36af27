"""Ring attention under context parallelism: per-rank memory and communication volume.

For one global problem (sequence ``S``, ``b`` sequences, ``np`` query heads, ``ng``
key/value heads, head dim ``hn``) and each cp size, every rank runs one forward and
backward of :func:`megacore.transformer.context_parallel.ring_attention` on its ``S/cp``
tokens and reports:

* saved-for-backward bytes (counted with ``torch.autograd.graph.saved_tensors_hooks``):
  the activation memory attention keeps between forward and backward, expected to fall
  as ``1/cp``;
* peak working memory of the forward+backward step: the rise of the process's resident
  high-water mark (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) over
  the resident size before the step, measured after one warm-up step (first calls map
  code pages). torch's CPU allocator maps large tensors with ``mmap`` and unmaps them
  on free, so this follows the live tensor bytes closely. The
  score blocks ``[s/cp, s/cp]`` per head dominate it, so it falls between ``1/cp`` and
  ``1/cp^2``;
* bytes sent per rank (counted by wrapping ``torch.distributed.batch_isend_irecv``),
  next to the analytic count: forward ``(cp-1)`` key/value blocks, backward ``(cp-1)``
  key/value blocks plus ``cp`` float32 key/value-gradient blocks, a block being
  ``2 * b * ng * S/cp * hn`` elements.

Ranks are forked gloo processes (``tests/multirank.py``), so run it from the repository
root::

    python benchmarks/bench_context_parallel.py --seq-length 2048 --cp-sizes 1 2 4

Timings on shared CPU machines swing 3-5x; they are printed for orientation only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacore import parallel_state as ps  # noqa: E402
from megacore.transformer.context_parallel import ring_attention  # noqa: E402
from tests.multirank import run_distributed  # noqa: E402

_MB = 2 ** 20


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _SentBytes:
    """Counts bytes of every isend passed to ``dist.batch_isend_irecv`` while active."""

    def __init__(self):
        self.total = 0
        self._original = None

    def __enter__(self):
        self._original = dist.batch_isend_irecv

        def counting(ops):
            for op in ops:
                if op.op is dist.isend:
                    self.total += op.tensor.numel() * op.tensor.element_size()
            return self._original(ops)

        dist.batch_isend_irecv = counting
        return self

    def __exit__(self, *exc):
        dist.batch_isend_irecv = self._original


def analytic_bytes_sent(cp: int, seq: int, b: int, ng: int, hn: int, elem: int) -> dict:
    """Bytes each rank sends per forward and backward step (see module docstring)."""
    block = 2 * b * ng * (seq // cp) * hn
    forward = (cp - 1) * block * elem
    backward = (cp - 1) * block * elem + (cp * block * 4 if cp > 1 else 0)
    return {"forward": forward, "backward": backward}


def _rank_step(cp: int, seq: int, b: int, np_: int, ng: int, hn: int, dtype_name: str):
    ps.initialize_model_parallel(context_parallel_size=cp)
    group = ps.get_context_parallel_group() if cp > 1 else None
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(1234 + dist.get_rank())
    local = seq // cp
    q = torch.randn(local, b, np_, hn, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(local, b, ng, hn, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(local, b, ng, hn, generator=gen, dtype=dtype).requires_grad_()
    dout = torch.randn(local, b, np_, hn, generator=gen, dtype=dtype)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    # Warm-up: first calls map code pages and gloo buffers, which would count as peak.
    # (On CUDA the RSS numbers are meaningless; device.max_memory_allocated would apply.)
    ring_attention(q, k, v, cp_group=group, causal=True).backward(dout)
    q.grad = k.grad = v.grad = None
    dist.barrier()
    can_reset = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _SentBytes() as fwd_sent:
        out = ring_attention(q, k, v, cp_group=group, causal=True)
    forward_s = time.perf_counter() - start
    with _SentBytes() as bwd_sent:
        out.backward(dout)
    step_s = time.perf_counter() - start
    peak = _status_bytes("VmHWM") - rss_before if can_reset else None
    return {"saved": sum(saved.values()), "peak": peak, "fwd_sent": fwd_sent.total,
            "bwd_sent": bwd_sent.total, "forward_s": forward_s, "step_s": step_s}


def _fmt_mb(value) -> str:
    return "n/a" if value is None else f"{value / _MB:9.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--num-query-groups", type=int, default=8)
    parser.add_argument("--kv-channels", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    shape = (args.seq_length, args.micro_batch_size, args.num_attention_heads,
             args.num_query_groups, args.kv_channels)
    print(f"S={shape[0]} b={shape[1]} np={shape[2]} ng={shape[3]} hn={shape[4]} "
          f"{args.dtype}; per-rank numbers are the max over ranks\n")
    print(f"{'cp':>3} {'saved MB':>9} {'x cp=1':>7} {'peak MB':>9} {'x cp=1':>7} "
          f"{'fwd sent MB':>11} {'analytic':>9} {'bwd sent MB':>11} {'analytic':>9} "
          f"{'step s':>7}")
    base = None
    elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    for cp in args.cp_sizes:
        results = run_distributed(_rank_step, cp, args=(cp, *shape, args.dtype), timeout=600)
        worst = {key: (None if any(r[key] is None for r in results)
                       else max(r[key] for r in results)) for key in results[0]}
        base = base or worst
        expect = analytic_bytes_sent(cp, shape[0], shape[1], shape[3], shape[4], elem)
        ratio = (lambda key: "n/a" if worst[key] is None or not base[key]
                 else f"{worst[key] / base[key]:7.3f}")
        print(f"{cp:>3} {_fmt_mb(worst['saved'])} {ratio('saved'):>7} "
              f"{_fmt_mb(worst['peak'])} {ratio('peak'):>7} "
              f"{_fmt_mb(worst['fwd_sent']):>11} {_fmt_mb(expect['forward']):>9} "
              f"{_fmt_mb(worst['bwd_sent']):>11} {_fmt_mb(expect['backward']):>9} "
              f"{worst['step_s']:7.2f}")


if __name__ == "__main__":
    main()
