"""A tiny MLP trained three ways: single-process torch reference, DDP + megacore optimizer
on data-parallel ranks, and the same with tensor parallelism.

Model: ``x [b, 8] -> fc1 (8 -> 16) -> gelu -> fc2 (16 -> 8) -> LayerNorm(8)``, MSE loss
against ``y [b, 8]``. Weights come from one seeded ``master`` dict (non-zero biases and
norm weights so every param matters). Step ``k`` uses global batch ``batches[k]``; data
rank ``r`` of ``dp`` takes rows ``[r*b/dp, (r+1)*b/dp)``, so the dp-mean of the local
mean losses is the global mean loss of the reference.

Under tp the model is ColumnParallelLinear(fc1) -> gelu -> RowParallelLinear(fc2) ->
LayerNorm (replicated over tp: its grad copies must be counted once in the grad norm).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore import parallel_state
from megacore.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megacore.model_parallel_config import ModelParallelConfig
from megacore.optimizer import OptimizerConfig, OptimizerParamScheduler, get_megatron_optimizer

# The first torch optimizer built in a process imports torch._dynamo (~5 s, more on busy
# cores). Build one here, in the parent, so forked ranks inherit the import.
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])

IN, HIDDEN, OUT = 8, 16, 8
GLOBAL_BATCH = 8
LR, WEIGHT_DECAY, CLIP = 0.02, 0.1, 0.05  # CLIP small enough that clipping is active


def make_master(seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(HIDDEN, IN, generator=g) * 0.3,
            "fc1.bias": torch.randn(HIDDEN, generator=g) * 0.1,
            "fc2.weight": torch.randn(OUT, HIDDEN, generator=g) * 0.3,
            "fc2.bias": torch.randn(OUT, generator=g) * 0.1,
            "norm.weight": 1.0 + torch.randn(OUT, generator=g) * 0.1,
            "norm.bias": torch.randn(OUT, generator=g) * 0.1}


def make_batches(steps: int, seed: int = 1) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, IN, generator=g),
             torch.randn(GLOBAL_BATCH, OUT, generator=g)) for _ in range(steps)]


class RefModel(torch.nn.Module):
    def __init__(self, master: Dict[str, torch.Tensor], dtype=torch.float32):
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, OUT)
        self.norm = torch.nn.LayerNorm(OUT)
        self.load_state_dict(master)
        self.to(dtype)

    def forward(self, x):
        return self.norm(self.fc2(F.gelu(self.fc1(x))))


class TPModel(torch.nn.Module):
    def __init__(self, master: Dict[str, torch.Tensor], config: ModelParallelConfig):
        super().__init__()
        from megacore.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        noop = lambda w: None  # noqa: E731 - weights are copied from the master below
        self.fc1 = ColumnParallelLinear(IN, HIDDEN, config=config, init_method=noop, bias=True)
        self.fc2 = RowParallelLinear(HIDDEN, OUT, config=config, init_method=noop, bias=True,
                                     input_is_parallel=True)
        self.norm = torch.nn.LayerNorm(OUT)
        tp, rank = self.fc1.tp_size, self.fc1.tp_rank
        with torch.no_grad():
            self.fc1.weight.copy_(master["fc1.weight"].chunk(tp, 0)[rank])
            self.fc1.bias.copy_(master["fc1.bias"].chunk(tp, 0)[rank])
            self.fc2.weight.copy_(master["fc2.weight"].chunk(tp, 1)[rank])
            self.fc2.bias.copy_(master["fc2.bias"])
            self.norm.weight.copy_(master["norm.weight"])
            self.norm.bias.copy_(master["norm.bias"])

    def forward(self, x):
        h, _ = self.fc1(x)
        out, _ = self.fc2(F.gelu(h))
        return self.norm(out)


def no_decay(name: str) -> bool:
    return name.endswith("bias") or name.startswith("norm")


def reference_run(master, batches, restart_at: Optional[int] = None,
                  scheduler_args: Optional[dict] = None):
    """Single-process AdamW with clipping; returns (params, grad norms per step)."""
    model = RefModel(master)
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if not no_decay(n)],
               "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in named.items() if no_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR)
    for g in opt.param_groups:
        g["wd_mult"] = 1.0 if g["weight_decay"] else 0.0
    sched = OptimizerParamScheduler(opt, **scheduler_args) if scheduler_args else None
    norms = []
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        if sched:
            sched.step(1)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


SCHEDULER_ARGS = dict(init_lr=0.0, max_lr=LR, min_lr=LR / 10, lr_warmup_steps=1,
                      lr_decay_steps=6, lr_decay_style="cosine", start_wd=WEIGHT_DECAY,
                      end_wd=WEIGHT_DECAY, wd_incr_steps=6, wd_incr_style="constant")


@dataclasses.dataclass
class Case:
    """One parallel training configuration."""

    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bucket_size: Optional[int] = None
    tp: bool = False
    average_in_collective: bool = False
    expert_fc2: bool = False  # mark fc2 as expert params (allreduce=False): chained optimizer


def build(master, case: Case, opt_kwargs: Optional[dict] = None, dtype=torch.float32):
    """DDP-wrapped model and its optimizer on this rank."""
    pgs = parallel_state.get_process_group_collection()
    config = ModelParallelConfig(tensor_model_parallel_size=pgs.size("tp"), params_dtype=dtype,
                                 bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    module = TPModel(master, config) if case.tp else RefModel(master, dtype)
    module.to(dtype)
    if case.expert_fc2:
        for p in module.fc2.parameters():
            p.allreduce = False
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=case.overlap_grad_reduce,
        overlap_param_gather=case.overlap_param_gather,
        use_distributed_optimizer=case.use_distributed_optimizer,
        bucket_size=case.bucket_size, average_in_collective=case.average_in_collective)
    model = DistributedDataParallel(config, ddp_config, module)
    kwargs = dict(lr=LR, weight_decay=WEIGHT_DECAY, clip_grad=CLIP,
                  use_distributed_optimizer=case.use_distributed_optimizer,
                  bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    kwargs.update(opt_kwargs or {})
    optimizer = get_megatron_optimizer(
        OptimizerConfig(**kwargs), [model],
        no_weight_decay_cond=lambda name, p: no_decay(name.removeprefix("module.")))
    return model, optimizer


def local_batch(x: torch.Tensor, y: torch.Tensor):
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    rows = GLOBAL_BATCH // dp
    return x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]


def train_step(model, optimizer, x, y, scheduler=None, before_step=None):
    model.zero_grad_buffer()
    optimizer.zero_grad()
    xl, yl = local_batch(x, y)
    loss = F.mse_loss(model(xl.to(model.config.params_dtype)).float(), yl)
    optimizer.scale_loss(loss).backward()
    finalize_model_grads([model])
    if before_step is not None:
        before_step(model)
    result = optimizer.step()
    if scheduler is not None:
        scheduler.step(1)
    return result


def full_params(model) -> Dict[str, torch.Tensor]:
    """Params in the reference's names and full shapes (tp shards all-gathered)."""
    if model.ddp_config.overlap_param_gather:
        model.start_param_sync(force_sync=True)  # pre-hooks gather lazily: finish now
    module = model.module
    if isinstance(module, RefModel):
        return {n: p.detach().float().clone() for n, p in module.named_parameters()}
    group = parallel_state.get_tensor_model_parallel_group()

    def gather(t, dim):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.detach().contiguous(), group=group)
        return torch.cat(parts, dim)

    return {"fc1.weight": gather(module.fc1.weight, 0), "fc1.bias": gather(module.fc1.bias, 0),
            "fc2.weight": gather(module.fc2.weight, 1),
            "fc2.bias": module.fc2.bias.detach().clone(),
            "norm.weight": module.norm.weight.detach().clone(),
            "norm.bias": module.norm.bias.detach().clone()}
