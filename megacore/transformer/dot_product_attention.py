"""Core attention: ``softmax(scale * q k^T + mask) v`` for this rank's heads.

``config.attention_backend`` picks the kernel (see ``AttnBackend``):

* ``auto`` (default), ``flash``, ``fused``: torch's ``scaled_dot_product_attention`` with
  attention dropout applied inside the kernel, so training never materialises the
  ``[b, np, sq, sk]`` scores where a fused kernel exists for the device, mask and
  dropout (FlashAttention / memory-efficient on CUDA; the fused CPU kernel without
  dropout). ``flash`` and ``fused`` restrict torch to those kernels and fail with a
  message naming ``--attention-backend`` where none can run;
* ``unfused`` / ``local``: the explicit matmul-softmax-matmul path, the reference.

Attention dropout. By default the mask comes from the kernel's own random stream, drawn
under the keyed RNG stream of this layer and tp rank (so recompute replays it and every
pipeline stage draws the same): layouts then agree exactly at attention dropout 0 and
statistically otherwise. ``config.layout_independent_attention_dropout`` opts into the
keyed hash mask of :mod:`megacore.transformer.context_parallel.keyed_dropout` instead,
identical for every tp/cp/pp layout, at the cost of the explicit path.

Masks: ``causal`` needs no tensor (for ``sq < sk``, as when decoding with a KV cache,
query i sits at key position ``sk - sq + i``); ``padding`` takes a bool mask
``[b or 1, 1, sq, sk]`` with ``True`` = masked out (Megatron's convention). A sliding
window (``config.window_size = (left, right)``) narrows the causal mask to a band: the
query at key position ``p`` sees keys ``p - left .. p + right`` (also when decoding one
token against a long KV cache).
``[b or 1, 1, sq, sk]`` with ``True`` = masked out (Megatron's convention). Any mask built
by :func:`build_attention_bias_mask` goes to the fused kernels as ``attn_mask``.

Context parallelism (``config.context_parallel_size > 1``): the local sequence is this
rank's share of the load-balanced split and attention runs as ring attention over the cp
group (``megacore.transformer.context_parallel``; causal or no mask, no padding masks),
each ring step on a fused kernel returning its log-sum-exp.

Shapes: query ``[sq, b, np/tp, hn]``, key/value ``[sk, b, ng/tp, hn]`` (``ng/tp`` is at
least 1: replicated key/value heads when ``ng < tp``), output ``[sq, b, np/tp * hn]``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megacore import device
from megacore.parallel_state import ProcessGroupCollection
from megacore.tensor_parallel.random import keyed_stream
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

__all__ = ["DotProductAttention", "build_attention_bias_mask", "sdpa_kernels"]

_EXPLICIT_BACKENDS = (AttnBackend.unfused, AttnBackend.local)


def sdpa_kernels(backend: AttnBackend, device_type: str) -> Optional[list]:
    """The SDPA kernels ``backend`` allows on ``device_type`` (None: torch chooses).

    Raises:
        ValueError: ``flash`` off CUDA, naming ``--attention-backend``.
    """
    if backend == AttnBackend.auto:
        return None
    if backend == AttnBackend.flash:
        if device_type != "cuda":
            raise ValueError(f"--attention-backend flash (attention_backend=flash) needs a "
                             f"CUDA device with FlashAttention; this run is on "
                             f"{device_type}: use --attention-backend auto, fused or unfused")
        return [SDPBackend.FLASH_ATTENTION]
    if backend == AttnBackend.fused:
        if device_type == "cuda":
            return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        return [SDPBackend.FLASH_ATTENTION]  # torch's fused CPU kernel
    raise ValueError(f"attention_backend {backend.name} does not use SDPA")


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

    Raises:
        ValueError: the backend cannot run on this device (message names the flag).
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
        self.backend = config.attention_backend
        self.use_sdpa = self.backend not in _EXPLICIT_BACKENDS
        self.sdpa_kernels = sdpa_kernels(self.backend, device.device_type()) \
            if self.use_sdpa else None
        self.layout_independent_dropout = config.layout_independent_attention_dropout
        # Keyed dropout draws its seed from the layer's stream (equal on all tp ranks, the
        # mask hashes global heads); kernel dropout draws from a stream per layer and tp
        # rank, since each tp rank holds different heads.
        # Sliding window (left, right) keys around each query; None: full attention.
        self.window_size = config.window_size
        self._dropout_stream = f"dropout/layer{self.layer_number}/attention"
        self._kernel_dropout_stream = f"{self._dropout_stream}/tp{self.tp_rank}"
        # Context parallelism (megacore.transformer.context_parallel): ring attention.
        # The cp group decides (TransformerBlock checked the config agrees with it).
        self.cp_group = self.pg_collection.cp if self.cp_size > 1 else None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                attn_mask_type: Optional[AttnMaskType] = None) -> torch.Tensor:
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        dropout_p = self.dropout_p if self.training else 0.0
        if self.cp_group is not None:  # context parallelism: [s/cp, b, np/tp * hn]
            return context_parallel_core_attention(
                query, key, value, cp_group=self.cp_group, attn_mask_type=mask_type,
                attention_mask=attention_mask, softmax_scale=self.softmax_scale,
                dropout_p=dropout_p, head_offset=self.tp_rank * self.num_heads_per_partition,
                dropout_stream=self._dropout_stream,
                fused=self.backend not in _EXPLICIT_BACKENDS)
        sq, b, n, hn = query.shape
        sk = key.size(0)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        keyed = self.layout_independent_dropout and dropout_p > 0.0
        if self.use_sdpa and not keyed:
            ctx = self._sdpa(q, k, v, mask_type, attention_mask, sq, sk, dropout_p)
        else:
            ctx = self._unfused(q, k, v, mask_type, attention_mask, sq, sk, dropout_p, keyed)
        # [b, np, sq, hv] -> [sq, b, np, hv] -> [sq, b, np * hv] (hv: value head dim)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, n * ctx.size(-1))

    def _sdpa(self, q, k, v, mask_type, attention_mask, sq, sk, dropout_p):
        """Fused attention ``[b, np, sq, hn]``; dropout inside the kernel."""
        is_causal = mask_type == AttnMaskType.causal and sq == sk and self.window_size is None
        mask = None
        if not is_causal:
            mask = build_attention_bias_mask(mask_type, attention_mask, sq, sk, q.device,
                                             self.window_size)
            mask = None if mask is None else ~mask  # SDPA: True = attend
        restrict = contextlib.nullcontext() if self.sdpa_kernels is None \
            else sdpa_kernel(self.sdpa_kernels)
        stream = self._kernel_dropout_stream if dropout_p > 0.0 else None
        try:
            with restrict, keyed_stream(stream):
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=self.softmax_scale, enable_gqa=k.size(1) != q.size(1))
        except RuntimeError as e:
            if self.sdpa_kernels is None or "No available kernel" not in str(e):
                raise
            raise RuntimeError(
                f"--attention-backend {self.backend.name}: no {self.backend.name} kernel "
                f"runs here (device {q.device.type}, dtype {q.dtype}, "
                f"mask {'yes' if mask is not None else 'none'}, dropout {dropout_p}); use "
                f"--attention-backend auto or unfused") from e

    def _unfused(self, q, k, v, mask_type, attention_mask, sq, sk, dropout_p, keyed):
        """Explicit attention ``[b, np, sq, hn]`` through the ``[b, np, sq, sk]`` scores."""
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
        if dropout_p > 0.0:
            if keyed:
                probs = self._keyed_dropout(probs, sq, sk, dropout_p)
            else:
                with keyed_stream(self._kernel_dropout_stream):
                    probs = F.dropout(probs, dropout_p)
        return torch.matmul(probs, v)

    def _keyed_dropout(self, probs: torch.Tensor, sq: int, sk: int, p: float) -> torch.Tensor:
        """Dropout on probabilities ``[b, np/tp, sq, sk]`` with the keyed mask of ring
        attention: a hash of (seed, batch, global head, query position, key position), so
        tp, cp and pp layouts drop exactly the same elements."""
        seed = draw_attention_dropout_seed(self._dropout_stream)
        dev = probs.device
        first_head = self.tp_rank * self.num_heads_per_partition
        keep = attention_dropout_keep_mask(
            seed, probs.size(0), torch.arange(first_head, first_head + probs.size(1), device=dev),
            torch.arange(sk - sq, sk, device=dev), torch.arange(sk, device=dev), p)
        return probs.masked_fill(~keep, 0.0) * (1.0 / (1.0 - p))
