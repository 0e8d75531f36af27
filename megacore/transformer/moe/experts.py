"""The routed experts of one rank: ``SequentialMLP`` (reference) and ``GroupedMLP``.

Both take the rows of a token dispatcher, grouped by local expert, and return one output
row per input row: ``forward(x [N, h], tokens_per_expert [El]) -> (y [N, h], None)``.

Initialization does not depend on the layout: expert ``e`` (global index) is always
initialized inside ``init_rng_scope("expert.<e>")`` with the master-weight draws of an
``MLP`` (fc1 ``[F1, h]`` with ``init_method``, then fc2 ``[h, f]`` with
``output_layer_init_method``; ``F1 = 2f`` when gated), and each rank keeps its experts'
expert-tp shards. So with ep=2 expert 3 equals expert 3 of the ep=1 model from the same
seed, and ``GroupedMLP`` holds exactly the weights of ``SequentialMLP``.

Expert tensor parallelism (etp): fc1 is column-parallel and fc2 row-parallel over the
expert-tp group; the input rows are the same on every etp rank and the output is
all-reduced, so it is complete on every etp rank (the dispatchers rely on this).

Every expert parameter has ``allreduce=False``: its grad is reduced over the
expert-data-parallel group, not the data-parallel group.

Shapes: ``N`` rows, ``h`` hidden, ``f`` expert ffn width, ``El`` local experts,
``etp`` expert-tp size.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from megacore import device
from megacore.parallel_state import ProcessGroupCollection
from megacore.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megacore.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megacore.transformer.initialization import init_rng_scope
from megacore.transformer.mlp import MLP, MLPSubmodules
from megacore.transformer.module import resolve_pg_collection

__all__ = ["SequentialMLP", "GroupedMLP", "expert_init_key"]


def expert_init_key(global_expert_index: int) -> str:
    """The ``init_rng_scope`` key of a routed expert (same in every layout)."""
    return f"expert.{global_expert_index}"


def _local_expert_indices(num_local_experts: int, pgs: ProcessGroupCollection):
    first = dist.get_rank(pgs.ep) * num_local_experts
    return list(range(first, first + num_local_experts))


def _expert_config(config):
    # Experts receive whole tokens after dispatch: sequence parallelism does not apply.
    return dataclasses.replace(config, sequence_parallel=False) if config.sequence_parallel \
        else config


def _split_rows(x: torch.Tensor, tokens_per_expert) -> list:
    sizes = [int(n) for n in (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert)
                              else tokens_per_expert)]
    return list(torch.split(x, sizes, dim=0))


class SequentialMLP(torch.nn.Module):
    """One :class:`MLP` per local expert, run one after the other.

    Args:
        num_local_experts: experts on this rank.
        config: transformer + MoE config (``moe_ffn_hidden_size`` or ``ffn_hidden_size``).
        submodules: the MLP's linear layers (column/row-parallel).
        pg_collection: process groups (default: ``parallel_state``'s grid).
    """

    def __init__(self, num_local_experts: int, config, submodules: MLPSubmodules,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__()
        pgs = resolve_pg_collection(pg_collection)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = _local_expert_indices(num_local_experts, pgs)
        expert_config = _expert_config(config)
        ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
        experts = []
        for index in self.local_expert_indices:
            with init_rng_scope(expert_init_key(index)):
                experts.append(MLP(expert_config, submodules, ffn_hidden_size=ffn,
                                   is_expert=True, pg_collection=pgs))
        self.local_experts = torch.nn.ModuleList(experts)

    def forward(self, x: torch.Tensor, tokens_per_expert):
        outputs = []
        # Every expert runs, even on [0, h]: etp peers must meet in its collectives, and
        # its parameters then get (zero) grads like everyone else's.
        for expert, rows in zip(self.local_experts, _split_rows(x, tokens_per_expert)):
            out, bias = expert(rows)  # [n_e, h]
            outputs.append(out if bias is None else out + bias)
        return torch.cat(outputs, dim=0), None


class GroupedMLP(torch.nn.Module):
    """All local experts as stacked weights, computed with one batched matmul per linear.

    Rows are padded per expert to the largest count and run through ``torch.bmm``:
    ``[El, n_max, h] @ [El, h, F1/etp] -> act -> @ [El, f/etp, h]``. (``torch._grouped_mm``
    would avoid the padding, but in torch 2.13 it has no CPU backward.)

    Args: as :class:`SequentialMLP` (``submodules`` is accepted and unused).
    """

    def __init__(self, num_local_experts: int, config, submodules=None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__()
        pgs = resolve_pg_collection(pg_collection)
        self.config = config
        self.num_local_experts = num_local_experts
        self.local_expert_indices = _local_expert_indices(num_local_experts, pgs)
        self.etp_group = pgs.expt_tp
        self.etp_size, self.etp_rank = dist.get_world_size(pgs.expt_tp), dist.get_rank(pgs.expt_tp)
        self.gated = config.gated_linear_unit
        self.activation_func = config.activation_func
        h, f = config.hidden_size, config.moe_ffn_hidden_size or config.ffn_hidden_size
        self.ffn = f
        fc1_out = (2 * f if self.gated else f) // self.etp_size
        kind = dict(dtype=config.params_dtype, device=device.current_device())
        self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, h, fc1_out, **kind))
        self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, f // self.etp_size, h,
                                                      **kind))
        set_tensor_model_parallel_attributes(self.weight1, True, 2, 2 if self.gated else 1)
        set_tensor_model_parallel_attributes(self.weight2, True, 1, 1)
        self.bias1 = self.bias2 = None
        if config.add_bias_linear:
            self.bias1 = torch.nn.Parameter(torch.zeros(num_local_experts, fc1_out, **kind))
            self.bias2 = torch.nn.Parameter(torch.zeros(num_local_experts, h, **kind))
            set_tensor_model_parallel_attributes(self.bias1, True, 1, 2 if self.gated else 1)
        for param in self.parameters():
            param.allreduce = False
        if config.perform_initialization:
            self._init_weights()

    def _init_weights(self) -> None:
        """The master draws of ``MLP`` per expert (module docstring), sharded over etp."""
        h, f, cfg = self.config.hidden_size, self.ffn, self.config
        stride = 2 if self.gated else 1
        for local, index in enumerate(self.local_expert_indices):
            with init_rng_scope(expert_init_key(index)):
                fc1 = torch.empty(2 * f if self.gated else f, h, dtype=torch.float32)
                cfg.init_method(fc1)  # [F1, h], like ColumnParallelLinear
                fc2 = torch.empty(h, f, dtype=torch.float32)
                cfg.output_layer_init_method(fc2)  # [h, f], like RowParallelLinear
            with torch.no_grad():
                self.weight1[local].copy_(self._shard(fc1, 0, stride).t())  # [h, F1/etp]
                self.weight2[local].copy_(self._shard(fc2, 1, 1).t())  # [f/etp, h]

    def _shard(self, master: torch.Tensor, dim: int, stride: int) -> torch.Tensor:
        # Same blocks as tensor_parallel.layers: dim cut in etp*stride blocks, keep r, r+etp...
        blocks = master.chunk(self.etp_size * stride, dim=dim)
        return torch.cat(blocks[self.etp_rank::self.etp_size], dim=dim)

    def forward(self, x: torch.Tensor, tokens_per_expert):
        counts = [int(n) for n in (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert)
                                   else tokens_per_expert)]
        x = copy_to_tensor_model_parallel_region(x, self.etp_group)  # bwd: all-reduce over etp
        index, valid = self._padding_index(counts, x.device)
        rows = torch.cat([x, x.new_zeros(1, x.size(1))])  # row N reads as zeros (padding)
        padded = rows[index]  # [El, n_max, h]
        hidden = torch.bmm(padded, self.weight1)  # [El, n_max, F1/etp]
        if self.bias1 is not None:
            hidden = hidden + self.bias1.unsqueeze(1)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)  # [gate_r; up_r]
            hidden = self.activation_func(gate) * up
        else:
            hidden = self.activation_func(hidden)
        out = torch.bmm(hidden, self.weight2)  # [El, n_max, h], partial over etp
        out = out.reshape(-1, out.size(-1))[valid]  # [N, h], rows back in input order
        out = reduce_from_tensor_model_parallel_region(out, self.etp_group)
        if self.bias2 is not None:
            expert_of_row = torch.repeat_interleave(
                torch.arange(len(counts), device=x.device), torch.tensor(counts, device=x.device))
            out = out + self.bias2[expert_of_row]
        return out, None

    @staticmethod
    def _padding_index(counts, dev):
        """``index [El, n_max]`` of input rows (N for padding) and the flat valid slots."""
        n_max = max(counts) if counts else 0
        total = sum(counts)
        index = torch.full((len(counts), n_max), total, dtype=torch.long, device=dev)
        valid = []
        start = 0
        for e, n in enumerate(counts):
            index[e, :n] = torch.arange(start, start + n, device=dev)
            valid.append(torch.arange(e * n_max, e * n_max + n, device=dev))
            start += n
        return index, torch.cat(valid) if valid else torch.zeros(0, dtype=torch.long,
                                                                 device=dev)
