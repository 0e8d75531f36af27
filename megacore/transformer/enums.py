"""Enumerations shared by the transformer building blocks (Megatron-Core names and values).

They are plain ``enum.Enum`` classes so a config or a module spec can name a choice
without importing the module that implements it.
"""

from __future__ import annotations

import enum

__all__ = ["ModelType", "LayerType", "AttnType", "AttnMaskType", "AttnBackend"]


class ModelType(enum.Enum):
    """What kind of network a model is (the pipeline schedules read it)."""

    encoder_or_decoder = 1
    encoder_and_decoder = 2


class LayerType(enum.Enum):
    """Where a transformer layer sits in an encoder-decoder network."""

    encoder = 1
    decoder = 2


class AttnType(enum.Enum):
    """Whether keys and values come from the same sequence as the queries."""

    self_attn = 1
    cross_attn = 2


class AttnMaskType(enum.Enum):
    """How attention is masked.

    ``causal``: token i sees tokens <= i (no mask tensor needed); ``padding``: the mask
    tensor passed to ``forward`` (``True`` = masked out, Megatron's convention);
    ``padding_causal``: both; ``no_mask``: every token sees every token.
    """

    padding = 1
    causal = 2
    no_mask = 3
    padding_causal = 4


class AttnBackend(enum.Enum):
    """Which kernel computes ``softmax(q k^T / sqrt(d)) v`` (Megatron's
    ``--attention-backend``).

    * ``auto`` (default): ``torch.nn.functional.scaled_dot_product_attention`` with
      attention dropout inside the kernel; torch picks the fastest kernel it has for the
      device, dtype, mask and dropout (FlashAttention or memory-efficient on CUDA, the
      fused CPU kernel on CPU; on CPU with dropout on, torch has no fused kernel and uses
      its own math kernel, as plain PyTorch code calling SDPA does).
    * ``flash``: the FlashAttention kernel only (CUDA, 16-bit, no arbitrary mask); an
      error names the flag where it cannot run.
    * ``fused``: a fused kernel only: memory-efficient or cuDNN attention on CUDA, the
      fused (flash-style) kernel on CPU, which has no dropout; an error names the flag
      where none can run.
    * ``unfused`` / ``local``: the explicit matmul-softmax-matmul path, which materialises
      the ``[b, np, sq, sk]`` scores; the reference the others are tested against.

    ``TransformerConfig.layout_independent_attention_dropout`` takes the explicit path
    (or the explicit ring) whenever attention dropout is active, whatever the backend.
    """

    flash = 1
    fused = 2
    unfused = 3
    local = 4
    auto = 5
