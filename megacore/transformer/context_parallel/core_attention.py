"""Core attention under context parallelism: what ``DotProductAttention`` runs when
``config.context_parallel_size > 1``.

It adapts :func:`~megacore.transformer.context_parallel.ring_attention.ring_attention` to
the core-attention contract (mask types, dropout, output ``[sq, b, np/tp * hn]``) and
rejects what a ring over the zigzag split cannot express: padding masks (a rank would
need the mask columns of every other rank's keys) and key/value caches (``sk != sq``).

Dropout uses the keyed mask of :mod:`.keyed_dropout` (whatever
``layout_independent_attention_dropout`` says: the ring has no in-kernel dropout): its seed is drawn from
``dropout_stream`` (the layer's keyed stream of the RNG tracker, or the default generator
without one), which is identical on every cp and tp rank and does not depend on the
pipeline stage; each rank passes the global index of its first head, so the mask is one
mask of the whole ``[b, np, s, s]`` matrix whatever the layout.

Shapes: query ``[s/cp, b, np/tp, hn]``, key/value ``[s/cp, b, ng/tp, hn]``, output
``[s/cp, b, np/tp * hn]``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megacore.transformer.context_parallel.keyed_dropout import draw_attention_dropout_seed
from megacore.transformer.context_parallel.ring_attention import ring_attention
from megacore.transformer.enums import AttnMaskType

__all__ = ["context_parallel_core_attention"]

def context_parallel_core_attention(query: torch.Tensor, key: torch.Tensor,
                                    value: torch.Tensor, *, cp_group: dist.ProcessGroup,
                                    attn_mask_type: AttnMaskType,
                                    attention_mask: Optional[torch.Tensor],
                                    softmax_scale: float, dropout_p: float = 0.0,
                                    head_offset: int = 0,
                                    dropout_stream: Optional[str] = None,
                                    fused: bool = True) -> torch.Tensor:
    """Ring attention over ``cp_group`` with core-attention arguments.

    Args:
        query: ``[s/cp, b, np/tp, hn]``.
        key: ``[s/cp, b, ng/tp, hn]``.
        value: like ``key``.
        cp_group: the context-parallel group.
        attn_mask_type: ``causal`` or ``no_mask``.
        attention_mask: must be None (padding masks are not supported under cp).
        softmax_scale: score scale.
        dropout_p: attention dropout probability in effect (0 in eval).
        head_offset: global index of this rank's first query head (``tp_rank * np/tp``).
        dropout_stream: keyed RNG stream the dropout seed is drawn from.
        fused: ring steps on fused kernels returning their LSE (no ``[s/cp, s/cp]``
            scores); attention dropout always takes the explicit keyed path, since no
            fused kernel takes an external dropout mask.

    Returns:
        ``[s/cp, b, np/tp * hn]``.
    """
    if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
        raise ValueError(f"context_parallel_size > 1 supports attn_mask_type causal or "
                         f"no_mask, got {attn_mask_type.name}")
    if attention_mask is not None and attn_mask_type != AttnMaskType.causal:
        raise ValueError("context_parallel_size > 1 does not support attention masks; "
                         "pass attention_mask=None")
    if key.size(0) != query.size(0):
        raise ValueError(f"context_parallel_size > 1 needs as many keys as queries per rank "
                         f"(no key/value cache); got {key.size(0)} keys, {query.size(0)} queries")
    seed = None
    if dropout_p > 0.0:
        seed = draw_attention_dropout_seed(dropout_stream)
    out = ring_attention(query, key, value, cp_group=cp_group,
                         causal=attn_mask_type == AttnMaskType.causal,
                         softmax_scale=softmax_scale, dropout_p=dropout_p, dropout_seed=seed,
                         head_offset=head_offset, fused=fused)
    s, b, n, hn = out.shape
    return out.reshape(s, b, n * hn)  # [s/cp, b, np/tp, hn] -> [s/cp, b, np/tp * hn]
