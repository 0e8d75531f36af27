"""GPTModel step cost on CPU: time and memory vs plain PyTorch, collective bytes,
activation memory.

Prints three tables, each measured next to its reference:

1. fwd+bwd step of ``GPTModel`` (tp=1, default ``--attention-backend auto``) against a
   nanoGPT-style plain-PyTorch model of the same architecture written below (same
   weights: logits are checked equal first), which calls
   ``F.scaled_dot_product_attention(dropout_p=...)`` and ``F.dropout``, at attention and
   hidden dropout 0.1 (Megatron's default) and 0, sequences 1024 and 2048 (GPT-2 style,
   2 layers, hidden 256, 4 heads, batch 2). Time: median over interleaved repeats.
   Memory: (a) bytes saved for backward (unique storages, parameters excluded), exact;
   (b) peak resident memory of the step above the process's resident memory before it,
   each model in its own fresh process (``max_memory_allocated`` on CUDA).
   Targets: time ratio <= 1.05, memory ratio <= 1.10.
2. Bytes moved by tensor-parallel collectives per transformer layer per step at tp=2,
   counted by wrapping ``torch.distributed`` collectives, against the analytic count:
   without sequence parallelism 4 all-reduces of ``b*s*h`` per layer (2 forward, 2
   backward); with it the same volume as 4 all-gathers + 4 reduce-scatters, plus 2
   all-gathers in backward that re-gather the column-parallel inputs instead of keeping
   them (Megatron does the same). Reported as ring "bus bytes" sent per rank
   (all-reduce ``2(t-1)/t * n``, all-gather / reduce-scatter ``(t-1)/t * n``).
3. Activation memory per layer, bf16, measured with saved-tensor hooks (unique storages
   saved for backward, parameters excluded; per layer = model with 2L layers minus L)
   against Korthikanti et al. 2022: ``s*b*h*(34 + 5*a*s/h)`` bytes, ``/t`` with tensor +
   sequence parallelism, ``34*s*b*h/t`` with selective recompute.

Run: ``python benchmarks/bench_gpt_step.py [--quick] [--repeats N] [--only-step]``
(several minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megacore import collectives  # noqa: E402
from megacore import device  # noqa: E402
from megacore import parallel_state as ps  # noqa: E402
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec  # noqa: E402
from megacore.tensor_parallel import model_parallel_manual_seed  # noqa: E402
from megacore.transformer import TransformerConfig  # noqa: E402
from tests.multirank import run_distributed  # noqa: E402  (fork-based gloo ranks)


# -- 1. a nanoGPT-style reference ---------------------------------------------------------
class NanoBlock(nn.Module):
    def __init__(self, h, heads, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.c_attn, self.c_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.c_fc, self.mlp_proj = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):  # [b, s, h]
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, s, h)))
        return x + self.resid_dropout(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class NanoGPT(nn.Module):
    def __init__(self, vocab, seq, h, heads, layers, dropout=0.0):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, h), nn.Embedding(seq, h)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(NanoBlock(h, heads, dropout) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(h), nn.Linear(h, vocab, bias=False)

    def forward(self, ids, labels=None):
        x = self.drop(self.wte(ids) + self.wpe(torch.arange(ids.size(1))))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")


def _copy_weights(model: GPTModel, nano: NanoGPT, heads: int) -> None:
    """megacore layout -> nanoGPT layout (fused QKV is per head [np, 3, hn] in megacore)."""
    h = model.config.hidden_size
    hn = h // heads
    with torch.no_grad():
        nano.wte.weight.copy_(model.embedding.word_embeddings.weight)
        nano.wpe.weight.copy_(model.embedding.position_embeddings.weight)
        for layer, block in zip(model.decoder.layers, nano.blocks):
            att, mlp = layer.self_attention, layer.mlp
            w = att.linear_qkv.weight.view(heads, 3, hn, h).transpose(0, 1).reshape(3 * h, h)
            b = att.linear_qkv.bias.view(heads, 3, hn).transpose(0, 1).reshape(3 * h)
            block.c_attn.weight.copy_(w)
            block.c_attn.bias.copy_(b)
            for src, dst in ((layer.input_layernorm, block.ln_1),
                             (layer.pre_mlp_layernorm, block.ln_2),
                             (att.linear_proj, block.c_proj), (mlp.linear_fc1, block.c_fc),
                             (mlp.linear_fc2, block.mlp_proj)):
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
        nano.ln_f.weight.copy_(model.decoder.final_layernorm.weight)
        nano.ln_f.bias.copy_(model.decoder.final_layernorm.bias)
        nano.lm_head.weight.copy_(model.output_layer.weight)


def _gpt_config(layers, h, heads, **kw):
    base = dict(num_layers=layers, hidden_size=h, num_attention_heads=heads,
                hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _time_steps(step, iters):
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _step_models(shape, dropout):
    """(GPTModel, NanoGPT, ids, pos) with equal weights; the max |logit diff| in eval."""
    ps.initialize_model_parallel()
    vocab, seq, b, h, heads, layers = shape
    model_parallel_manual_seed(0)
    model = GPTModel(_gpt_config(layers, h, heads, hidden_dropout=dropout,
                                 attention_dropout=dropout),
                     get_gpt_layer_local_spec(), vocab, seq)
    nano = NanoGPT(vocab, seq, h, heads, layers, dropout)
    _copy_weights(model, nano, heads)
    ids = torch.randint(0, vocab, (b, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq).expand(b, seq)
    model.eval(), nano.eval()
    with torch.no_grad():
        diff = (model(ids, pos, None) - nano(ids)).abs().max().item()
    model.train(), nano.train()
    return model, nano, ids, pos, diff


def _steps(model, nano, ids, pos):
    def ours():
        model.zero_grad(set_to_none=True)
        model(ids, pos, None, labels=ids).mean().backward()

    def plain():
        nano.zero_grad(set_to_none=True)
        nano(ids, ids).mean().backward()

    return ours, plain


def _bench_time(shape, dropout, iters):
    torch.set_num_threads(1)
    model, nano, ids, pos, diff = _step_models(shape, dropout)
    ours, plain = _steps(model, nano, ids, pos)
    ours(), plain()  # warm-up
    t_ours, t_plain = [], []
    for _ in range(iters):  # interleave so machine noise hits both alike
        t_ours += _time_steps(ours, 1)
        t_plain += _time_steps(plain, 1)
    return diff, statistics.median(t_ours), statistics.median(t_plain)


def _saved_step_bytes(model, step):
    """Unique storages saved for backward during ``step`` (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (kB there)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_step_peak(step) -> int:
    """Resident high-water mark of one ``step`` above the resident memory before it.

    Large buffers go straight to mmap (fixed threshold, no trimming delay), so freed
    activations leave the resident set at once and the high-water mark tracks the peak of
    live tensors; the mark is reset through /proc/self/clear_refs before the step.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, disables glibc's raising it
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    libc.malloc_trim(0)
    start = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set size
    step()
    return max(_status_bytes("VmHWM") - start, 0)


def _bench_memory(shape, dropout, which):
    """Run in a fresh rank: (saved bytes, median peak bytes of a step above its start)."""
    torch.set_num_threads(1)
    model, nano, ids, pos, _ = _step_models(shape, dropout)
    ours, plain = _steps(model, nano, ids, pos)
    step, module = (ours, model) if which == "ours" else (plain, nano)
    saved = _saved_step_bytes(module, step)  # also the warm-up step
    peaks = []
    for _ in range(3):
        module.zero_grad(set_to_none=True)
        if device.device_type() == "cuda":
            torch.cuda.reset_peak_memory_stats()
            start = device.memory_allocated()
            step()
            peaks.append(device.max_memory_allocated() - start)
        else:
            peaks.append(_cpu_step_peak(step))
    return saved, statistics.median(peaks)


def _print_step_table(args):
    seqs = (256, 512) if args.quick else (1024, 2048)
    iters = args.repeats or (3 if args.quick else 7)
    print("\n1. fwd+bwd step, tp=1, CPU 1 thread, GPT-2 style (vocab 4096, b 2, h 256, "
          "4 heads, 2 layers); megacore (--attention-backend auto) vs plain PyTorch SDPA")
    print(f"   {'dropout':>7} {'seq':>5} {'ours ms':>9} {'plain ms':>9} {'time':>6}   "
          f"{'saved MB':>9} {'plain':>8} {'ratio':>6}   {'peak MB':>8} {'plain':>8} "
          f"{'ratio':>6}   logit diff")
    for dropout in (0.1, 0.0):
        for seq in seqs:
            shape = (4096, seq, 2, 256, 4, 2)
            diff, t_ours, t_plain = run_distributed(_bench_time, 1, args=(shape, dropout, iters),
                                                    timeout=1800)[0]
            mem = {which: run_distributed(_bench_memory, 1, args=(shape, dropout, which),
                                          timeout=1200)[0] for which in ("ours", "plain")}
            (s_ours, p_ours), (s_plain, p_plain) = mem["ours"], mem["plain"]
            print(f"   {dropout:7.1f} {seq:5d} {t_ours * 1e3:9.1f} {t_plain * 1e3:9.1f} "
                  f"{t_ours / t_plain:6.3f}   {s_ours / 1e6:9.1f} {s_plain / 1e6:8.1f} "
                  f"{s_ours / s_plain:6.3f}   {p_ours / 1e6:8.1f} {p_plain / 1e6:8.1f} "
                  f"{p_ours / max(p_plain, 1):6.3f}   {diff:.1e}", flush=True)
    print("   targets: time ratio <= 1.05, memory ratio <= 1.10 (saved = bytes kept for "
          "backward; peak = resident high-water mark of one step above its start)")


def main():
    # gloo's old collective names warn in torch 2.13 (shared/CPU_NOTES.md); not our signal.
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer iterations")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per model and configuration (default 7, quick 3)")
    parser.add_argument("--only-step", action="store_true",
                        help="print only table 1 (step time and memory vs plain PyTorch)")
    args = parser.parse_args()
    _print_step_table(args)
    if args.only_step:
        return
    comm_shape = (512, 64, 2, 128, 4, 1)
    vocab, s, b, h, heads, _ = comm_shape
    print(f"\n2. tensor-parallel collectives per layer per step, tp=2, (s, b, h) = "
          f"({s}, {b}, {h}), fp32, bus bytes per rank")
    unit = s * b * h * 4 * (2 - 1) / 2  # (t-1)/t * b*s*h*4 bytes
    analytic = {False: {"all_reduce": 4 * 2 * unit},
                True: {"all_gather_single": (4 + 2) * unit,
                       "reduce_scatter_single": 4 * unit}}
    for sp in (False, True):
        measured = run_distributed(_collective_bytes, 2, args=(comm_shape, sp), timeout=600)[0]
        for name in sorted(set(measured) | set(analytic[sp])):
            m, a = measured.get(name, 0.0), analytic[sp].get(name, 0.0)
            if m == 0 and a == 0:
                continue  # e.g. the loss's small all-reduces: the same for L and 2L layers
            print(f"   sp={sp!s:5} {name:24} measured {m / 1e6:8.3f} MB  analytic "
                  f"{a / 1e6:8.3f} MB  ratio {m / a if a else float('nan'):.3f}")
        total_m = sum(measured.values())
        print(f"   sp={sp!s:5} {'total':24} measured {total_m / 1e6:8.3f} MB  (4 all-reduce "
              f"equivalents = {8 * unit / 1e6:.3f} MB)")

    mem_shape = (512, 128, 2, 128, 4, 1)
    vocab, s, b, h, a, _ = mem_shape
    sbh = s * b * h
    print(f"\n3. activation memory per layer, bf16, dropout on, (s, b, h, a) = ({s}, {b}, {h}, "
          f"{a})")
    for tp, sp, rc, formula, label in (
            (1, False, False, sbh * (34 + 5 * a * s / h), "tp=1"),
            (2, True, False, sbh * (34 + 5 * a * s / h) / 2, "tp=2 + SP"),
            (2, True, True, 34 * sbh / 2, "tp=2 + SP + selective")):
        measured = run_distributed(_activation_memory, tp, args=(mem_shape, tp, sp, rc),
                                   timeout=600)[0]
        print(f"   {label:24} measured {measured / 1e6:8.3f} MB  Korthikanti "
              f"{formula / 1e6:8.3f} MB  ratio {measured / formula:.3f}")


if __name__ == "__main__":
    main()
