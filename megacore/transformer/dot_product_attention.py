"""Core attention: ``softmax(scale * q k^T + mask) v`` for this rank's heads.

Two kernels compute the same function (``config.attention_backend``):

* torch's ``scaled_dot_product_attention`` (``auto``/``flash``/``fused``): fastest on CPU
  and GPU, handles grouped-query attention natively;
* the explicit matmul-softmax-matmul path (``unfused``/``local``): the reference, and the
  path used whenever attention dropout is active, because megacore draws the dropout
  mask itself so that it does not depend on the tensor-parallel layout (see
  ``megacore.transformer.dropout``).

Masks: ``causal`` needs no tensor (for ``sq < sk``, as when decoding with a KV cache,
query i sits at key position ``sk - sq + i``); ``padding`` takes a bool mask
``[b or 1, 1, sq, sk]`` with ``True`` = masked out (Megatron's convention). A sliding
window (``config.window_size = (left, right)``) narrows the causal mask to a band: the
query at key position ``p`` sees keys ``p - left .. p + right`` (also when decoding one
token against a long KV cache).

Context parallelism (``config.context_parallel_size > 1``): the local sequence is this
rank's share of the load-balanced split and attention runs as ring attention over the cp
group (``megacore.transformer.context_parallel``; causal or no mask, no padding masks).

Shapes: query ``[sq, b, np/tp, hn]``, key/value ``[sk, b, ng/tp, hn]`` (``ng/tp`` is at
least 1: replicated key/value heads when ``ng < tp``), output ``[sq, b, np/tp * hn]``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore.parallel_state import ProcessGroupCollection
from megacore.transformer.context_parallel.core_attention import (
    context_parallel_core_attention,
)
from megacore.transformer.context_parallel.keyed_dropout import (
    attention_dropout_keep_mask,
    draw_attention_dropout_seed,
)
from megacore.transformer.enums import AttnBackend, AttnMaskType
from megacore.transformer.module import MegatronModule
from megacore.transformer.transformer_config import TransformerConfig

__all__ = ["DotProductAttention", "build_attention_bias_mask"]

_SDPA_BACKENDS = (AttnBackend.auto, AttnBackend.flash, AttnBackend.fused)


def build_attention_bias_mask(attn_mask_type: AttnMaskType, attention_mask: Optional[torch.Tensor],
                              sq: int, sk: int, device: torch.device,
                              window_size: Optional[Tuple[int, int]] = None
                              ) -> Optional[torch.Tensor]:
    """Bool mask ``[b or 1, 1, sq, sk]`` (True = masked out) combining causal, sliding
    window and padding; None when nothing is masked."""
    mask = None
    if attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal) and sq > 1:
        # Query i is at key position (sk - sq + i): it may not see keys after that.
        # (One query, the newest token of a cached decode step, sees every key: no mask.)
        mask = torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)
        mask = mask.view(1, 1, sq, sk)
    if window_size is not None:
        band = _window_mask(window_size, sq, sk, device)
        mask = band if mask is None else (mask | band)
    if attn_mask_type in (AttnMaskType.padding, AttnMaskType.padding_causal):
        if attention_mask is None:
            raise ValueError(f"attn_mask_type {attn_mask_type.name} needs an attention_mask")
        mask = attention_mask if mask is None else (mask | attention_mask)
    return mask


def _window_mask(window_size: Tuple[int, int], sq: int, sk: int,
                 device: torch.device) -> torch.Tensor:
    """``[1, 1, sq, sk]``, True outside the band: query i (key position ``p = sk - sq + i``)
    keeps keys ``p - left .. p + right`` (``-1``: no bound on that side)."""
    left, right = window_size
    # offset[i, j] = j - p: how far key j lies after the query's own position.
    offset = (torch.arange(sk, device=device).view(1, sk)
              - torch.arange(sk - sq, sk, device=device).view(sq, 1))
    outside = torch.zeros(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        outside |= offset < -left
    if right >= 0:
        outside |= offset > right
    return outside.view(1, 1, sq, sk)


class DotProductAttention(MegatronModule):
    """Scaled dot-product attention over this rank's heads.

    Args:
        config: shape, dropout, backend and softmax settings.
        layer_number: 1-based global layer number (query-key layer scaling uses it).
        attn_mask_type: default mask type (``forward`` may override it).
        attention_type: ``"self"`` or ``"cross"`` (informational; same math).
        attention_dropout: overrides ``config.attention_dropout`` when given.
        softmax_scale: overrides ``config.softmax_scale`` when given.
        pg_collection: process groups (default: ``parallel_state``'s grid).
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.dropout_p = config.attention_dropout if attention_dropout is None \
            else attention_dropout
        scale = softmax_scale if softmax_scale is not None else config.softmax_scale
        self.softmax_scale = scale if scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.num_heads_per_partition = config.num_attention_heads // self.tp_size
        self.use_sdpa = config.attention_backend in _SDPA_BACKENDS
        # Sliding window (left, right) keys around each query; None: full attention.
        self.window_size = config.window_size
        # Attention-probability dropout draws from this layer's own keyed RNG stream.
        self._dropout_stream = f"dropout/layer{self.layer_number}/attention"
        # Context parallelism (megacore.transformer.context_parallel): ring attention.
        self.cp_group = self.pg_collection.cp if config.context_parallel_size > 1 else None
        if self.cp_group is not None and \
                dist.get_world_size(self.cp_group) != config.context_parallel_size:
            raise ValueError(f"context_parallel_size {config.context_parallel_size} does not "
                             f"match the cp group size {dist.get_world_size(self.cp_group)}")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                attn_mask_type: Optional[AttnMaskType] = None) -> torch.Tensor:
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if self.cp_group is not None:  # context parallelism: [s/cp, b, np/tp * hn]
            return context_parallel_core_attention(
                query, key, value, cp_group=self.cp_group, attn_mask_type=mask_type,
                attention_mask=attention_mask, softmax_scale=self.softmax_scale,
                dropout_p=self.dropout_p if self.training else 0.0,
                head_offset=self.tp_rank * self.num_heads_per_partition,
                dropout_stream=self._dropout_stream)
        sq, b, n, hn = query.shape
        sk = key.size(0)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_active = self.training and self.dropout_p > 0.0
        if self.use_sdpa and not dropout_active:
            ctx = self._sdpa(q, k, v, mask_type, attention_mask, sq, sk)
        else:
            ctx = self._unfused(q, k, v, mask_type, attention_mask, sq, sk)
        # [b, np, sq, hv] -> [sq, b, np, hv] -> [sq, b, np * hv] (hv: value head dim)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, n * ctx.size(-1))

    def _sdpa(self, q, k, v, mask_type, attention_mask, sq, sk):
        is_causal = mask_type == AttnMaskType.causal and sq == sk and self.window_size is None
        mask = None
        if not is_causal:
            mask = build_attention_bias_mask(mask_type, attention_mask, sq, sk, q.device,
                                             self.window_size)
            mask = None if mask is None else ~mask  # SDPA: True = attend
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=is_causal,
            scale=self.softmax_scale, enable_gqa=k.size(1) != q.size(1))

    def _unfused(self, q, k, v, mask_type, attention_mask, sq, sk):
        groups = q.size(1) // k.size(1)
        if groups > 1:
            # [b, ng, sk, hn] -> [b, np, sk, hn]: head i reads key/value head i // groups.
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        coeff = float(self.layer_number) if self.config.apply_query_key_layer_scaling else 1.0
        scores = torch.matmul(q, k.transpose(-2, -1)) * (self.softmax_scale / coeff)
        if self.config.attention_softmax_in_fp32:
            scores = scores.float()
        mask = build_attention_bias_mask(mask_type, attention_mask, sq, sk, q.device,
                                         self.window_size)
        if mask is not None:
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores * coeff, dim=-1).to(q.dtype)  # [b, np/tp, sq, sk]
        return torch.matmul(self._attention_dropout(probs, sq, sk), v)

    def _attention_dropout(self, probs: torch.Tensor, sq: int, sk: int) -> torch.Tensor:
        """Dropout on probabilities ``[b, np/tp, sq, sk]`` with the keyed mask of ring
        attention: a hash of (seed, batch, global head, query position, key position), so
        tp, cp and pp layouts drop exactly the same elements."""
        if not self.training or self.dropout_p == 0.0:
            return probs
        seed = draw_attention_dropout_seed(self._dropout_stream)
        dev = probs.device
        first_head = self.tp_rank * self.num_heads_per_partition
        keep = attention_dropout_keep_mask(
            seed, probs.size(0), torch.arange(first_head, first_head + probs.size(1), device=dev),
            torch.arange(sk - sq, sk, device=dev), torch.arange(sk, device=dev), self.dropout_p)
        return probs.masked_fill(~keep, 0.0) * (1.0 / (1.0 - self.dropout_p))
