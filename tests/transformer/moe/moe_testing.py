"""Helpers for the MoE tests: a config with the MoE fields, and a one-rank process-group
collection so a single-process reference model can be built inside a multi-rank test."""


import torch.distributed as dist
import torch.nn.functional as F

from megacore.parallel_state import ParallelLayout, ProcessGroupCollection
from megacore.transformer.transformer_config import TransformerConfig

_NAMES = ("tp", "cp", "dp", "dp_cp", "pp", "mp", "tp_cp", "tp_dp", "tp_dp_cp", "ep",
          "expt_tp", "tp_ep", "expt_dp", "tp_ep_pp", "embd", "pos_embd")


def make_config(**overrides) -> TransformerConfig:
    """Tiny MoE config: h=8, 8 experts of width 8, top-2, fp32, no dropout."""
    fields = dict(num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=8,
                  num_moe_experts=8, moe_router_topk=2, hidden_dropout=0.0,
                  attention_dropout=0.0, init_method_std=0.2, activation_func=F.gelu)
    fields.update(overrides)
    return TransformerConfig(**fields)


def single_rank_collection() -> ProcessGroupCollection:
    """Groups of size one (this rank alone), for reference models inside a multi-rank test.

    Collective: every rank must call it (each creates every singleton group).
    """
    mine, _ = dist.new_subgroups(group_size=1)
    rank = dist.get_rank()
    groups = {name: mine for name in _NAMES}
    return ProcessGroupCollection(layout=ParallelLayout(world_size=1),
                                  ranks={name: [rank] for name in _NAMES}, **groups)
