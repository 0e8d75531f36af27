"""The single-process model of a description, built on the meta device, as the converter's
source of truth for tensor names, module order and tp splits.

The converter never keeps its own list of a model's parameters: it builds megacore's
``GPTModel`` for the description (or the caller's decoder block spec) at tp = pp = ep = 1
on the meta device (no memory, no initialization, no RNG draws), and reads each tensor's
global name and split through the same function the online torch_dist format uses
(``sharded_state.model_tensor_entries``, which reads ``tensor_split``). A layer added to
megacore, or a custom spec with extra tp-split parameters, converts without a converter
edit.

Building a model needs process groups; here every group is this process alone: a
one-rank gloo world over an in-memory store when ``torch.distributed`` is not
initialized (destroyed again afterwards), else a one-rank group created by this rank only
(``use_local_synchronization``), so a rank of a running job may build it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megacore.checkpointing.parallel_layout import RankLayout
from megacore.checkpointing.sharded_state import model_tensor_entries
from megacore.checkpointing.tensor_split import TensorSplit
from megacore.models.gpt import GPTModel, get_gpt_decoder_block_spec
from megacore.parallel_state import ParallelLayout, ProcessGroupCollection
from megacore.transformer import TransformerConfig

__all__ = ["ModelTensors", "build_model_tensors", "single_rank_groups", "meta_device"]

_MODEL_PREFIX = "model/"


@dataclasses.dataclass(frozen=True)
class ModelTensors:
    """The canonical tensors of a model (``tensor_rules``' naming).

    Attributes:
        names: global names in module order (stacked experts one per expert, a tied
            output layer absent): exactly what a converted checkpoint holds.
        splits: name -> how it is split over tp.
        order: name -> its index in ``names``.
    """

    names: List[str]
    splits: Dict[str, TensorSplit]
    order: Dict[str, int]


class _ForceMeta(TorchFunctionMode):
    """Puts every tensor a factory function creates on the meta device, also where the
    caller names a device (layers ask ``device.current_device()``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is not None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Tensors created inside live on the meta device (shapes only)."""
    with torch.device("meta"), _ForceMeta():
        yield


@contextlib.contextmanager
def single_rank_groups() -> Iterator[ProcessGroupCollection]:
    """Process groups of a tp = pp = ep = dp = 1 grid holding this process alone (see the
    module docstring); released on exit."""
    own_world = not dist.is_initialized()
    if own_world:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()
    group = dist.new_group([rank], use_local_synchronization=True)
    layout = ParallelLayout(world_size=1)
    names = list(layout.all_groups())
    try:
        yield ProcessGroupCollection(layout=layout, ranks={n: [rank] for n in names},
                                     **{n: group for n in names})
    finally:
        if own_world:
            dist.destroy_process_group()
        else:
            dist.destroy_process_group(group)


def _config(desc) -> TransformerConfig:
    kw = desc.transformer_config_kwargs()
    kw.update(perform_initialization=False, tensor_model_parallel_size=1,
              pipeline_model_parallel_size=1, expert_model_parallel_size=1,
              expert_tensor_parallel_size=1, virtual_pipeline_model_parallel_size=None)
    return TransformerConfig(**kw)


def build_model_tensors(desc, block_spec: Optional[Any] = None) -> ModelTensors:
    """Names and splits of the model ``desc`` describes (a ``GPTDescription``), read from
    the model built on the meta device with ``block_spec`` (default: megacore's GPT
    decoder spec for the config)."""
    config = _config(desc)
    spec = block_spec if block_spec is not None else get_gpt_decoder_block_spec(config)
    with single_rank_groups() as pgs, meta_device():
        model = GPTModel(config, spec, pre_process=True, post_process=True,
                         pg_collection=pgs, **desc.gpt_model_kwargs())
        entries, _ = model_tensor_entries(model, RankLayout())
    owned = [(e.key[len(_MODEL_PREFIX):], e.split) for e in entries if e.owner]
    return ModelTensors(names=[name for name, _ in owned], splits=dict(owned),
                        order={name: i for i, (name, _) in enumerate(owned)})
