"""Bytes held per parameter per rank: params + grads + optimizer state, with and without
the distributed optimizer, for bf16 params with fp32 gradients and Adam.

Published figures (Megatron-LM distributed optimizer docs; ZeRO paper, stage 1):

* plain: 2 (bf16 param) + 4 (fp32 grad) + 4 (fp32 main param) + 8 (Adam m, v) = 18 B
* distributed optimizer over ``d`` data-parallel ranks: 2 + 4 + 12/d B
* FSDP2 (``--use-torch-fsdp2``, ZeRO-3) over ``d`` ranks: everything sharded. fp32:
  (4 param + 4 grad + 8 Adam) / d = 16/d B. bf16 compute with fp32 master weights (the
  sharded params are the fp32 masters, grads reduced and kept in fp32): also 16/d B, the
  ZeRO paper's stage-3 figure (2 + 2 + 12) / d for mixed precision. The bf16 copy of one
  gathered layer exists only while that layer runs and is not counted (it is freed
  after the step).

Measured from the tensors actually allocated after one training step (so Adam's state
exists): every storage reachable from the model params, the DDP grad/param buffers, the
optimizer's main params and its state, each storage counted once (views into a buffer
share its storage). The count includes bucket padding and Adam's per-tensor ``step``
scalars, which is why it is not exactly the formula. Ranks are forked gloo processes
(``tests/multirank.py``); run from the repository root::

    python benchmarks/bench_memory_per_param.py --hidden 1024 --layers 2 --dp-sizes 1 2 4 8
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Iterable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacore import parallel_state  # noqa: E402
from megacore.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
    fully_shard_model,
)
from megacore.model_parallel_config import ModelParallelConfig  # noqa: E402
from megacore.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from tests.multirank import run_distributed  # noqa: E402


def _storages(tensors: Iterable[torch.Tensor], seen: Dict[int, int]) -> None:
    for tensor in tensors:
        if torch.is_tensor(tensor):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()


def _bytes_held(model: DistributedDataParallel, optimizer) -> int:
    seen: Dict[int, int] = {}
    _storages(model.parameters(), seen)
    for buf in model.all_buffers:
        _storages([buf.grad_data, buf.param_data], seen)
    _storages(optimizer.get_parameters(), seen)
    for state in optimizer.optimizer.state.values():
        _storages(state.values(), seen)
    return sum(seen.values())


def _measure(hidden: int, layers: int, use_distributed_optimizer: bool) -> float:
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    config = ModelParallelConfig(bf16=True, params_dtype=torch.bfloat16)
    module = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden, bias=False)
                                   for _ in range(layers)]).to(torch.bfloat16)
    num_params = sum(p.numel() for p in module.parameters())
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer),
        module)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(lr=1e-4, bf16=True, use_distributed_optimizer=use_distributed_optimizer),
        [model])
    model.zero_grad_buffer()
    model(torch.randn(4, hidden, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    finalize_model_grads([model])
    optimizer.step()
    return _bytes_held(model, optimizer) / num_params


class _Layers(torch.nn.Sequential):
    """Linear layers, each its own FSDP2 unit."""

    def fully_shard_units(self):
        return list(self)


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _measure_fsdp2(hidden: int, layers: int, bf16_compute: bool) -> float:
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    module = _Layers(*[torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers)])
    num_params = sum(p.numel() for p in module.parameters())
    fully_shard_model(module, reshard_after_forward=True,
                      param_dtype=torch.bfloat16 if bf16_compute else None,
                      reduce_dtype=torch.float32)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-4), [module])
    module(torch.randn(4, hidden)).float().pow(2).mean().backward()
    finalize_model_grads([module])
    optimizer.step()
    seen: Dict[int, int] = {}
    _storages([_local(p) for p in module.parameters()], seen)
    _storages([_local(p.grad) for p in module.parameters()], seen)
    for state in optimizer.optimizer.state.values():
        _storages([_local(v) for v in state.values()], seen)
    return sum(seen.values()) / num_params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dp-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="relative difference from the published figure to accept")
    args = parser.parse_args(argv)
    print(f"model: {args.layers} x Linear({args.hidden}, {args.hidden}), Adam; bytes per "
          "parameter on each rank. plain/distributed: bf16 params, fp32 grads; fsdp2 fp32: "
          "all fp32; fsdp2 bf16: bf16 compute, fp32 master params and grads")
    print(f"{'dp':>3} {'optimizer':>12} {'measured':>9} {'published':>10} {'diff':>7}")
    worst = 0.0
    for dp in args.dp_sizes:
        for distributed in (False, True):
            measured = run_distributed(_measure, dp, args=(args.hidden, args.layers, distributed),
                                       timeout=600)
            published = 6 + 12 / dp if distributed else 18.0
            for value in measured:  # every rank holds the same amount
                worst = max(worst, abs(value - published) / published)
            diff = (measured[0] - published) / published
            print(f"{dp:>3} {'distributed' if distributed else 'plain':>12} "
                  f"{measured[0]:>9.3f} {published:>10.3f} {diff:>+7.2%}")
        for bf16 in (False, True):
            measured = run_distributed(_measure_fsdp2, dp, args=(args.hidden, args.layers, bf16),
                                       timeout=600)
            published = 16 / dp
            for value in measured:
                worst = max(worst, abs(value - published) / published)
            diff = (measured[0] - published) / published
            print(f"{dp:>3} {'fsdp2 bf16' if bf16 else 'fsdp2 fp32':>12} "
                  f"{measured[0]:>9.3f} {published:>10.3f} {diff:>+7.2%}")
    ok = worst <= args.tolerance
    print(f"largest difference {worst:.3%}: {'within' if ok else 'OUTSIDE'} "
          f"{args.tolerance:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
