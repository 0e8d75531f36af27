"""Training throughput and MFU of a ~1B-parameter Llama-style GPT on one device.

Builds megacore's ``GPTModel`` (Llama layer spec: RMSNorm, SwiGLU, RoPE, grouped-query
attention, no biases, no dropout) in bf16 with ``--attention-backend flash`` on CUDA,
wraps it in megacore's DDP with its mixed-precision Adam (float32 main weights and
gradients, distributed optimizer off), and times full training steps (forward, backward,
optimizer) through ``get_forward_backward_func``. Prints:

* model construction time (layout-independent initialization, the default);
* seconds per step, tokens/s, achieved TFLOP/s and MFU: model FLOPs from
  ``megacore.training.flops.num_floating_point_operations`` (Megatron's formula) over the
  device's dense bf16 peak (H100 SXM / H200 989, H100 PCIe 756, A100 312 TFLOP/s, or
  ``--peak-tflops``);
* the same for megatron-core's ``GPTModel`` of the same configuration (Transformer Engine
  layer spec when TE imports, else its local spec), its DDP and optimizer, in the same
  process, when megatron-core imports and the device is CUDA; the step-time ratio.

Targets (issue 19): >= 45% MFU on an H100 and within 5% of megatron-core's step time.

Default shape: hidden 2048, 20 layers, 32 heads, 8 key/value groups, SwiGLU width 5632,
vocabulary 32000 (untied), sequence 4096, micro-batch 1: 1.03e9 parameters.

Run: ``python benchmarks/bench_gpu_throughput.py`` on a GPU machine;
``python benchmarks/bench_gpu_throughput.py --tiny`` runs a tiny model end to end on CPU
(no MFU there: no peak figure) to check the script works; ``--build-only`` times only
the construction of the full-size model (works on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megacore import device, parallel_state  # noqa: E402
from megacore.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    build_training_hooks,
)
from megacore.models.gpt import (  # noqa: E402
    GPTModel,
    get_llama_layer_local_spec,
    llama_config_kwargs,
)
from megacore.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megacore.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megacore.tensor_parallel import model_parallel_manual_seed  # noqa: E402
from megacore.training.flops import num_floating_point_operations  # noqa: E402
from megacore.transformer import AttnBackend, TransformerConfig  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against the device name.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0))


@dataclasses.dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    micro_batch_size: int

    def flops_per_step(self) -> float:
        return num_floating_point_operations(
            batch_size=self.micro_batch_size, seq_length=self.seq_length,
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size,
            padded_vocab_size=self.vocab_size, num_query_groups=self.num_query_groups,
            gated_linear_unit=True)


LLAMA_1B = Shape(num_layers=20, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                 ffn_hidden_size=5632, vocab_size=32000, seq_length=4096, micro_batch_size=1)
TINY = Shape(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=128, vocab_size=256, seq_length=128, micro_batch_size=2)


def peak_tflops(override):
    if override:
        return override
    if device.device_type() != "cuda":
        return None
    name = device.device_name()
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)


def _batches(shape: Shape):
    """Random tokens (throughput does not depend on their values)."""
    gen = torch.Generator().manual_seed(0)
    dev = device.current_device()
    b, s = shape.micro_batch_size, shape.seq_length
    while True:
        tokens = torch.randint(0, shape.vocab_size, (b, s + 1), generator=gen).to(dev)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
               "position_ids": torch.arange(s, device=dev).expand(b, s)}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach()}

    return losses, loss_func


# -- megacore ------------------------------------------------------------------------------
def build_megacore(shape: Shape, bf16: bool, backend: AttnBackend, compile_layers: bool):
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads, ffn_hidden_size=shape.ffn_hidden_size,
        bf16=bf16, params_dtype=dtype, attention_backend=backend,
        **llama_config_kwargs(num_query_groups=shape.num_query_groups))
    model_parallel_manual_seed(1234)
    device.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    gpt = GPTModel(config, get_llama_layer_local_spec(), vocab_size=shape.vocab_size,
                   max_sequence_length=shape.seq_length, position_embedding_type="rope",
                   share_embeddings_and_output_weights=False)
    device.synchronize()
    build_s = time.perf_counter() - start
    # CPU seconds (all threads) of the build: comparable across loaded machines.
    print(f"   megacore build: {build_s:.2f} s wall, {time.process_time() - start_cpu:.2f} s "
          f"CPU", flush=True)
    if compile_layers:
        for layer in gpt.decoder.layers:
            layer.compile()
    model = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False), gpt)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.1, bf16=bf16,
                        params_dtype=dtype, clip_grad=1.0), [model])
    params = sum(p.numel() for p in gpt.parameters())
    return model, optimizer, build_s, params


def megacore_step(model, optimizer, data, shape: Shape):
    forward_backward = get_forward_backward_func()
    hooks = build_training_hooks(model, optimizer)

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(forward_step_func=_forward_step, data_iterator=data,
                                  model=model, num_microbatches=1,
                                  seq_length=shape.seq_length,
                                  micro_batch_size=shape.micro_batch_size, forward_only=False,
                                  hooks=hooks)
        optimizer.step()
        return float(losses[0]["lm loss"])

    return step


# -- megatron-core -------------------------------------------------------------------------
def megatron_available():
    """(True, spec name) when megatron-core can run the baseline here, else (False, why)."""
    if device.device_type() != "cuda":
        return False, "megatron-core's GPTModel needs CUDA (CPU run)"
    try:
        import megatron.core  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no baseline
        return False, f"megatron-core does not import: {e}"
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True, "transformer_engine"
    except Exception:  # noqa: BLE001
        return True, "local"


def build_megatron(shape: Shape, bf16: bool, spec_name: str):
    import torch.nn.functional as F
    from megatron.core import parallel_state as mps
    from megatron.core import tensor_parallel as mtp
    from megatron.core.distributed import DistributedDataParallel as MDDP
    from megatron.core.distributed import DistributedDataParallelConfig as MDDPConfig
    from megatron.core.distributed import finalize_model_grads as m_finalize
    from megatron.core.models.gpt import GPTModel as MGPTModel
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.optimizer import OptimizerConfig as MOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer as m_get_optimizer
    from megatron.core.transformer import TransformerConfig as MTransformerConfig

    mps.initialize_model_parallel()
    mtp.model_parallel_cuda_manual_seed(1234)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = MTransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups, ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bf16=bf16,
        params_dtype=dtype, pipeline_dtype=dtype, bias_activation_fusion=True)
    if spec_name == "transformer_engine":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    torch.cuda.synchronize()
    start = time.perf_counter()
    gpt = MGPTModel(config, spec, vocab_size=shape.vocab_size,
                    max_sequence_length=shape.seq_length, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False).cuda()
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    config.finalize_model_grads_func = m_finalize
    model = MDDP(config, MDDPConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
                 gpt)
    optimizer = m_get_optimizer(MOptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.1,
                                                 bf16=bf16, params_dtype=dtype, clip_grad=1.0),
                                [model])
    return model, optimizer, build_s, mps


def megatron_step(model, optimizer, data, shape: Shape):
    from megatron.core.pipeline_parallel import get_forward_backward_func as m_fb

    forward_backward = m_fb()

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(forward_step_func=_forward_step, data_iterator=data,
                                  model=[model], num_microbatches=1,
                                  seq_length=shape.seq_length,
                                  micro_batch_size=shape.micro_batch_size, forward_only=False)
        optimizer.step()
        return float(losses[0]["lm loss"])

    return step


# -- timing --------------------------------------------------------------------------------
def time_steps(step, warmup: int, iters: int):
    """Median seconds per step after ``warmup`` steps, and the last loss."""
    loss = None
    for _ in range(warmup):
        loss = step()
    device.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        loss = step()  # float(loss) synchronizes with the device
        device.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), loss


def report(name, shape: Shape, seconds, peak, build_s, loss):
    tokens = shape.micro_batch_size * shape.seq_length
    tflops = shape.flops_per_step() / seconds / 1e12
    mfu = f"{100 * tflops / peak:5.1f}%" if peak else "  n/a"
    print(f"   {name:28} build {build_s:7.2f} s   step {seconds * 1e3:9.1f} ms   "
          f"{tokens / seconds:10.0f} tokens/s   {tflops:8.2f} TFLOP/s   MFU {mfu}   "
          f"loss {loss:.3f}", flush=True)


def _init_process_group():
    if dist.is_initialized():
        return
    if "RANK" in os.environ:
        dist.init_process_group(device.default_backend())
        return
    store = os.path.join(tempfile.mkdtemp(prefix="megacore-bench-"), "store")
    dist.init_process_group(device.default_backend(), init_method=f"file://{store}",
                            rank=0, world_size=1)


def main(argv=None):
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model for a quick end-to-end check (runs on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak (default: from its name)")
    parser.add_argument("--no-megatron", action="store_true",
                        help="skip the megatron-core baseline")
    parser.add_argument("--build-only", action="store_true",
                        help="build the megacore model, print its construction time, stop")
    parser.add_argument("--compile-layers", action="store_true",
                        help="torch.compile each megacore transformer layer")
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else LLAMA_1B
    overrides = {k: v for k, v in (("seq_length", args.seq_length),
                                   ("micro_batch_size", args.micro_batch_size),
                                   ("num_layers", args.num_layers)) if v is not None}
    shape = dataclasses.replace(shape, **overrides)
    iters = args.iters or (3 if args.tiny else 10)
    cuda = device.device_type() == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    _init_process_group()
    parallel_state.initialize_model_parallel()
    # FlashAttention needs CUDA and 16-bit inputs; on CPU the fused default (auto).
    bf16 = cuda or not args.tiny
    backend = AttnBackend.flash if cuda else AttnBackend.auto
    peak = peak_tflops(args.peak_tflops)
    print(f"device {device.device_name()}; shape {shape}; bf16 {bf16}; attention backend "
          f"{backend.name}; {shape.flops_per_step() / 1e12:.1f} TFLOP per step; peak "
          f"{peak or 'unknown'} TFLOP/s", flush=True)

    model, optimizer, build_s, params = build_megacore(shape, bf16, backend, args.compile_layers)
    print(f"   megacore parameters {params / 1e6:.1f} M, built in {build_s:.2f} s "
          f"({torch.get_num_threads()} CPU threads)", flush=True)
    if args.build_only:
        return
    seconds, loss = time_steps(megacore_step(model, optimizer, _batches(shape), shape),
                               args.warmup, iters)
    report("megacore", shape, seconds, peak, build_s, loss)
    del model, optimizer
    parallel_state.destroy_model_parallel()
    device.empty_cache()

    ok, spec_name = megatron_available()
    if args.no_megatron or not ok:
        print(f"   megatron-core baseline: not run ({'--no-megatron' if ok else spec_name})")
        return
    m_model, m_optimizer, m_build_s, mps = build_megatron(shape, bf16, spec_name)
    m_seconds, m_loss = time_steps(megatron_step(m_model, m_optimizer, _batches(shape), shape),
                                   args.warmup, iters)
    report(f"megatron-core ({spec_name} spec)", shape, m_seconds, peak, m_build_s, m_loss)
    print(f"   step time megacore / megatron-core = {seconds / m_seconds:.3f} (target <= 1.05)")
    mps.destroy_model_parallel()


if __name__ == "__main__":
    main()
