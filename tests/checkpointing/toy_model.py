"""A tiny pipeline-splittable model built from megacore's tensor-parallel layers, and the
helpers the checkpointing tests share.

Every tensor is a layout-independent function of a seed: master weights are drawn from a
generator seeded per layer (so tp=2 x pp=2 builds the shards of the tp=1 x pp=1 model),
the padded vocabulary rows are zero, and :func:`fake_step` applies elementwise gradients
``0.1 * param`` (zero on zero padding rows) with Adam and no clipping. So any two layouts
built from the same seed and stepped the same way hold the same global tensors, and a
checkpoint saved in one layout must load into another as that layout's own reference.
"""

from __future__ import annotations

import math
import random
from typing import Dict, List, Optional

import numpy as np
import torch

from megacore import parallel_state as ps
from megacore.model_parallel_config import ModelParallelConfig
from megacore.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megacore.tensor_parallel.random import get_rng_tracker, model_parallel_manual_seed

TRUE_VOCAB, HIDDEN, FFN, NUM_LAYERS = 13, 8, 4, 4


def padded_vocab(tp: int) -> int:
    """Differs between tp=1 (15) and tp=2 (20), to exercise vocabulary refitting."""
    multiple = 5 * tp
    return int(math.ceil(TRUE_VOCAB / multiple) * multiple)


def _seeded_init(seed: int, rows: Optional[int] = None):
    def init(master: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            master.zero_()
            n = master.shape[0] if rows is None else rows
            master[:n] = torch.randn((n,) + tuple(master.shape[1:]), generator=gen)
        return master

    return init


class ToyLayer(torch.nn.Module):
    """Gated-MLP-like layer: fc1 column-parallel with stride 2, fc2 row-parallel."""

    def __init__(self, config: ModelParallelConfig, layer_number: int, seed: int):
        super().__init__()
        self.layer_number = layer_number
        base = seed + 100 * layer_number
        self.fc1 = ColumnParallelLinear(HIDDEN, 2 * FFN, config=config, stride=2,
                                        init_method=_seeded_init(base + 1))
        self.fc2 = RowParallelLinear(FFN, HIDDEN, config=config, bias=True,
                                     input_is_parallel=True, init_method=_seeded_init(base + 2))
        self.norm = torch.nn.LayerNorm(HIDDEN)
        with torch.no_grad():
            self.norm.weight.copy_(torch.linspace(0.5, 1.5, HIDDEN) + layer_number + seed)
            self.fc1.bias.copy_(_shard(torch.arange(2.0 * FFN) + seed, 0, 2))
            self.fc2.bias.fill_(0.25 * layer_number + seed)


def _shard(full: torch.Tensor, dim: int, stride: int) -> torch.Tensor:
    from megacore.tensor_parallel.layers import _shard_master_weight

    tp = ps.get_tensor_model_parallel_world_size()
    return _shard_master_weight(full, dim, stride, ps.get_tensor_model_parallel_rank(), tp)


class ToyModel(torch.nn.Module):
    """One model chunk; chunks ordered (virtual stage, pipeline rank) like the block."""

    def __init__(self, seed: int, vp_stage: int = 0, vpp: int = 1, tie: bool = True):
        super().__init__()
        pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), \
            ps.get_pipeline_model_parallel_rank()
        tp = ps.get_tensor_model_parallel_world_size()
        config = ModelParallelConfig(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
        per_chunk = NUM_LAYERS // (pp * vpp)
        offset = (vp_stage * pp + pp_rank) * per_chunk
        pre = pp_rank == 0 and vp_stage == 0
        post = pp_rank == pp - 1 and vp_stage == vpp - 1
        vocab = padded_vocab(tp)
        if pre:
            self.embedding = VocabParallelEmbedding(vocab, HIDDEN, config=config,
                                                    init_method=_seeded_init(seed, TRUE_VOCAB))
        self.layers = torch.nn.ModuleList(
            [ToyLayer(config, offset + i + 1, seed) for i in range(per_chunk)])
        if post:
            self.final_norm = torch.nn.LayerNorm(HIDDEN)
            self.output_layer = ColumnParallelLinear(
                HIDDEN, vocab, config=config, bias=False,
                init_method=_seeded_init(seed if tie else seed + 7, TRUE_VOCAB),
                skip_weight_param_allocation=tie and pre)
            self.register_buffer("counter", torch.zeros(2))
        if tie and pp > 1 and pre:
            self.embedding.weight.shared_embedding = True
        if tie and pp > 1 and post:
            self.output_layer.weight.shared_embedding = True


def build_chunks(seed: int, vpp: int = 1, tie: bool = True) -> List[ToyModel]:
    return [ToyModel(seed, v, vpp, tie) for v in range(vpp)]


def build_optimizer(chunks, distributed: bool = False):
    from megacore.optimizer import OptimizerConfig, OptimizerParamScheduler, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=0.0,
                             use_distributed_optimizer=distributed)
    optimizer = get_megatron_optimizer(config, chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=2,
        lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
        wd_incr_steps=10, wd_incr_style="constant")
    return optimizer, scheduler


def _params(chunk):
    module = chunk.module if hasattr(chunk, "module") else chunk
    return list(module.parameters())


def fake_step(chunks, optimizer, scheduler) -> None:
    """One Adam step with elementwise grads ``0.1 * param`` (layout-independent)."""
    for chunk in chunks:
        for p in _params(chunk):
            grad = 0.1 * p.detach()
            if hasattr(p, "main_grad"):
                p.main_grad.copy_(grad)
            else:
                p.grad = grad.clone()
        module = chunk.module if hasattr(chunk, "module") else chunk
        if hasattr(module, "counter"):
            module.counter += 1
    optimizer.step()
    scheduler.step(1)
    optimizer.zero_grad()


def flat_state(chunks, optimizer, scheduler) -> Dict[str, object]:
    """Every model tensor, optimizer state entry and scheduler value, flattened."""
    out: Dict[str, object] = {}
    for i, chunk in enumerate(chunks):
        module = chunk.module if hasattr(chunk, "module") else chunk
        for k, v in module.state_dict().items():
            out[f"model{i}.{k}"] = v.clone()
    if optimizer is not None:
        _flatten(optimizer.state_dict(), "optim", out)
    if scheduler is not None:
        _flatten(scheduler.state_dict(), "sched", out)
    return out


def _flatten(obj, prefix, out):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = obj.clone() if torch.is_tensor(obj) else obj


def assert_states_equal(actual: Dict[str, object], expected: Dict[str, object],
                        exact: bool = True) -> int:
    """Compare two :func:`flat_state` dicts; returns the number of tensors compared."""
    assert sorted(actual) == sorted(expected), set(actual) ^ set(expected)
    n = 0
    for key, want in expected.items():
        got = actual[key]
        if torch.is_tensor(want):
            # exact: a checkpoint copies bytes. Otherwise the reference ran the same
            # elementwise Adam step on the same values in another layout: fp32 rounding
            # of vectorized vs scalar loops at most, hence 1e-6.
            tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{key}: {m}")
            n += 1
        elif isinstance(want, float):
            assert math.isclose(got, want, rel_tol=1e-9), (key, got, want)
        else:
            assert got == want, (key, got, want)
    return n


def draw_randoms() -> List[torch.Tensor]:
    """One draw from each generator a checkpoint restores."""
    with get_rng_tracker().fork():
        tracked = torch.rand(2)
    return [torch.rand(3), torch.tensor(np.random.rand(2)), torch.tensor([random.random()]),
            tracked]


def setup(tp: int, pp: int, vpp: Optional[int] = None, seed: int = 1234) -> None:
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp)
    model_parallel_manual_seed(seed)
