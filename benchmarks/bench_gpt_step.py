"""GPTModel step cost on CPU: time vs plain PyTorch, collective bytes, activation memory.

Prints three tables, each measured next to its reference:

1. fwd+bwd step time of ``GPTModel`` (tp=1) against a nanoGPT-style plain-PyTorch model
   of the same architecture written below (same weights: logits are checked equal first).
   Target: ratio <= 1.10.
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

Run: ``python benchmarks/bench_gpt_step.py [--quick]`` (a few minutes on 2 cores).
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
from megacore import parallel_state as ps  # noqa: E402
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec  # noqa: E402
from megacore.tensor_parallel import model_parallel_manual_seed  # noqa: E402
from megacore.transformer import TransformerConfig  # noqa: E402
from tests.multirank import run_distributed  # noqa: E402  (fork-based gloo ranks)


# -- 1. a nanoGPT-style reference ---------------------------------------------------------
class NanoBlock(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.c_attn, self.c_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.c_fc, self.mlp_proj = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):  # [b, s, h]
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, s, h))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab, seq, h, heads, layers):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, h), nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(NanoBlock(h, heads) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(h), nn.Linear(h, vocab, bias=False)

    def forward(self, ids, labels=None):
        x = self.wte(ids) + self.wpe(torch.arange(ids.size(1)))
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


def _bench_time(shape, iters):
    torch.set_num_threads(1)
    ps.initialize_model_parallel()
    vocab, seq, b, h, heads, layers = shape
    model_parallel_manual_seed(0)
    model = GPTModel(_gpt_config(layers, h, heads), get_gpt_layer_local_spec(), vocab, seq)
    nano = NanoGPT(vocab, seq, h, heads, layers)
    _copy_weights(model, nano, heads)
    ids = torch.randint(0, vocab, (b, seq))
    pos = torch.arange(seq).expand(b, seq)
    with torch.no_grad():
        diff = (model(ids, pos, None) - nano(ids)).abs().max().item()

    def ours():
        model.zero_grad(set_to_none=True)
        model(ids, pos, None, labels=ids).mean().backward()

    def plain():
        nano.zero_grad(set_to_none=True)
        nano(ids, ids).mean().backward()

    ours(), plain()  # warm-up
    t_ours, t_plain = [], []
    for _ in range(iters):  # interleave so machine noise hits both alike
        t_ours += _time_steps(ours, 1)
        t_plain += _time_steps(plain, 1)
    return diff, statistics.median(t_ours), statistics.median(t_plain)


# -- 2. collective bytes ------------------------------------------------------------------
# all_reduce is called on torch.distributed; the flat all-gather / reduce-scatter through
# megacore.collectives (whose names follow the installed PyTorch).
_WRAPPED = ((dist, "all_reduce"), (collectives, "all_gather_single"),
            (collectives, "reduce_scatter_single"))


def _install_counters(counts):
    world = dist.get_world_size()

    def wrap(name, fn):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            t = dist.get_world_size(group) if group is not None else world
            if t > 1:
                if name == "all_reduce":
                    n, factor = args[0], 2.0
                elif name == "all_gather_single":
                    n, factor = args[0], 1.0  # output: the full tensor
                else:
                    n, factor = args[1], 1.0  # input: the full tensor
                nbytes = n.numel() * n.element_size()
                counts[name] = counts.get(name, 0) + factor * (t - 1) / t * nbytes
            return fn(*args, **kwargs)
        return counted

    for owner, name in _WRAPPED:
        setattr(owner, name, wrap(name, getattr(owner, name)))


def _collective_bytes(shape, sequence_parallel):
    torch.set_num_threads(1)
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    vocab, seq, b, h, heads, layers = shape
    ids = torch.randint(0, vocab, (b, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq).expand(b, seq)
    per_model = {}
    counts = {}
    _install_counters(counts)
    for n_layers in (layers, 2 * layers):
        model_parallel_manual_seed(0)
        model = GPTModel(_gpt_config(n_layers, h, heads, tensor_model_parallel_size=2,
                                     sequence_parallel=sequence_parallel),
                         get_gpt_layer_local_spec(), vocab, seq)
        counts.clear()
        model(ids, pos, None, labels=ids).mean().backward()
        per_model[n_layers] = dict(counts)
    keys = set(per_model[layers]) | set(per_model[2 * layers])
    return {k: (per_model[2 * layers].get(k, 0) - per_model[layers].get(k, 0)) / layers
            for k in keys}


# -- 3. activation memory ------------------------------------------------------------------
def _saved_bytes(model, ids, pos):
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, pos, None, labels=ids)
    loss.mean().backward()
    return sum(seen.values())


def _activation_memory(shape, tp, sequence_parallel, recompute):
    torch.set_num_threads(1)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    vocab, seq, b, h, heads, layers = shape
    ids = torch.randint(0, vocab, (b, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq).expand(b, seq)
    sizes = {}
    for n_layers in (layers, 2 * layers):
        model_parallel_manual_seed(0)
        cfg = _gpt_config(n_layers, h, heads, tensor_model_parallel_size=tp,
                          sequence_parallel=sequence_parallel, hidden_dropout=0.1,
                          attention_dropout=0.1, bf16=True, params_dtype=torch.bfloat16,
                          attention_softmax_in_fp32=False,
                          recompute_granularity="selective" if recompute else None)
        model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab, seq)
        sizes[n_layers] = _saved_bytes(model, ids, pos)
    return (sizes[2 * layers] - sizes[layers]) / layers


def main():
    # gloo's old collective names warn in torch 2.13 (shared/CPU_NOTES.md); not our signal.
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer iterations")
    args = parser.parse_args()
    # vocab, seq, batch, hidden, heads, layers
    time_shape = (2048, 128, 4, 256, 8, 4) if args.quick else (4096, 256, 8, 256, 8, 6)
    iters = 5 if args.quick else 10
    diff, t_ours, t_plain = run_distributed(_bench_time, 1, args=(time_shape, iters),
                                            timeout=1200)[0]
    print(f"\n1. fwd+bwd step, tp=1, CPU 1 thread, shape (vocab, s, b, h, heads, layers) = "
          f"{time_shape}; max |logit diff| vs plain = {diff:.2e}")
    print(f"   GPTModel {t_ours * 1e3:8.1f} ms   plain PyTorch {t_plain * 1e3:8.1f} ms   "
          f"ratio {t_ours / t_plain:.3f}  (target <= 1.10)")

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
