"""How each tensor of a model chunk is split over tensor parallelism, as its modules say.

The one place that reads the marks layers put on their tensors, for every reader of
checkpoints: the online torch_dist save and load (``sharded_state``) and the offline
converter, which reads them from the single-process model built on the meta device
(``conversion.reference_model``). A new layer whose parameters carry these marks needs
no checkpoint or converter edit.

The marks:

* ``tensor_model_parallel``, ``partition_dim``, ``partition_stride`` on the tensor
  (``tensor_parallel.layers.set_tensor_model_parallel_attributes``): split along
  ``partition_dim`` in ``tp * stride`` blocks (stride 2: gated fc1 ``[gate; up]``);
* ``allreduce=False`` on the tensor: an expert tensor, split over expert-tp and placed
  by ep (``transformer.moe.experts``);
* a vocabulary dim 0 (padded to a multiple of tp): the weight of a
  ``VocabParallelEmbedding``, or a tensor marked ``is_embedding_or_output_parameter``
  or ``shared_embedding`` (``models.gpt``);
* a fused QKV in the per-group row layout (``transformer.qkv_layout``): ``linear_qkv``
  of a module with ``kv_replicated`` (``transformer.attention.SelfAttention``), whose
  key/value rows are replicated when there are fewer groups than tp ranks;
* experts stacked on dim 0 (grouped GEMM): the params of a module with
  ``local_expert_indices`` and no ``local_experts`` list whose dim 0 is the local
  expert count.

Example: a gated MLP's ``linear_fc1.weight`` ``[2f/tp, h]`` reads as
``TensorSplit(tp_dim=0, stride=2)``; its ``linear_fc2.bias`` as ``TensorSplit()``
(replicated).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from megacore.tensor_parallel.layers import VocabParallelEmbedding

__all__ = ["QKVGroups", "TensorSplit", "tensor_split", "tensor_splits",
           "stacked_expert_indices"]


@dataclasses.dataclass(frozen=True)
class QKVGroups:
    """The head geometry of a fused QKV tensor (``transformer.qkv_layout``'s arguments).

    Attributes:
        num_attention_heads: query heads ``np``.
        num_query_groups: key/value heads ``ng``.
        kv_channels: head dim ``hn``.
    """

    num_attention_heads: int
    num_query_groups: int
    kv_channels: int

    def layout_kwargs(self, tp_size: int) -> dict:
        """Keyword arguments of ``expand_qkv_rows`` / ``collapse_qkv_rows`` for ``tp_size``."""
        return dict(num_attention_heads=self.num_attention_heads,
                    num_query_groups=self.num_query_groups, kv_channels=self.kv_channels,
                    tp_size=tp_size)


@dataclasses.dataclass(frozen=True)
class TensorSplit:
    """How one model tensor is split over tp (see the module docstring).

    Attributes:
        tp_dim: split dim, None when replicated over tp.
        stride: blocks per rank along ``tp_dim`` (rank r keeps blocks r, r + tp, ...).
        expert: a routed expert's tensor (split over expert-tp, placed by ep).
        vocab: dim 0 is the vocabulary, padded to a multiple of tp.
        qkv: head geometry of a fused QKV (k/v rows replicated when ng < tp), else None.
    """

    tp_dim: Optional[int] = None
    stride: int = 1
    expert: bool = False
    vocab: bool = False
    qkv: Optional[QKVGroups] = None

    def without_leading_dim(self) -> "TensorSplit":
        """The split of one slice along dim 0 (one expert of a stacked-experts param)."""
        tp_dim = None if self.tp_dim is None else self.tp_dim - 1
        return dataclasses.replace(self, tp_dim=tp_dim)


def tensor_split(tensor: torch.Tensor, *, vocab: bool = False,
                 qkv: Optional[QKVGroups] = None) -> TensorSplit:
    """The split of one tensor from its attributes (``vocab``/``qkv``: what its module
    says, see :func:`tensor_splits`)."""
    vocab = (vocab or bool(getattr(tensor, "shared_embedding", False))
             or bool(getattr(tensor, "is_embedding_or_output_parameter", False)))
    expert = getattr(tensor, "allreduce", True) is False
    if not getattr(tensor, "tensor_model_parallel", False):
        return TensorSplit(expert=expert, vocab=vocab)
    return TensorSplit(tp_dim=int(tensor.partition_dim),
                       stride=int(getattr(tensor, "partition_stride", 1)), expert=expert,
                       vocab=vocab, qkv=qkv)


def _qkv_groups(module: torch.nn.Module) -> Dict[str, QKVGroups]:
    """Local state-dict name -> geometry, for the fused QKV weight and bias."""
    out = {}
    for name, sub in module.named_modules():
        if not (hasattr(sub, "kv_replicated") and hasattr(sub, "linear_qkv")):
            continue
        cfg = sub.config
        groups = QKVGroups(cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels)
        prefix = f"{name}.linear_qkv." if name else "linear_qkv."
        out[prefix + "weight"] = groups
        out[prefix + "bias"] = groups
    return out


def _vocab_names(module: torch.nn.Module) -> set:
    return {f"{name}.weight" if name else "weight" for name, sub in module.named_modules()
            if isinstance(sub, VocabParallelEmbedding)}


def tensor_splits(module: torch.nn.Module) -> Dict[str, TensorSplit]:
    """Local state-dict name -> :class:`TensorSplit`, for every tensor of ``module``'s
    state dict (stacked-experts params as the whole ``[El, ...]`` tensor)."""
    qkv, vocab = _qkv_groups(module), _vocab_names(module)
    return {local: tensor_split(tensor, vocab=local in vocab, qkv=qkv.get(local))
            for local, tensor in module.state_dict(keep_vars=True).items()
            if torch.is_tensor(tensor)}


def stacked_expert_indices(module: torch.nn.Module) -> Dict[str, List[int]]:
    """Local name -> global expert indices, for params stacking this rank's experts on
    dim 0 (grouped experts: a module with ``local_expert_indices`` and no
    ``local_experts`` list). Checkpoints hold each expert under its own key, so any ep
    loads."""
    out = {}
    for name, sub in module.named_modules():
        indices = getattr(sub, "local_expert_indices", None)
        if indices is None or hasattr(sub, "local_experts"):
            continue
        for pname, param in sub.named_parameters(recurse=False):
            if param.dim() >= 1 and param.shape[0] == len(indices):
                out[f"{name}.{pname}" if name else pname] = list(indices)
    return out
