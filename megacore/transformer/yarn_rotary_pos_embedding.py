"""YaRN rotary embeddings (Peng et al. 2023) as DeepSeek-V2/V3 use them with multi-latent
attention (``rope_type="yarn"``, Megatron-Core's ``YarnRotaryEmbedding``).

A model trained on ``L = original_max_position_embeddings`` tokens is run on ``factor``
times longer sequences by changing three things (the formulas of ``transformers``'
``_compute_yarn_parameters`` / ``yarn_apply_mscale`` and of DeepSeek's reference code):

* Frequencies. Rotary pair ``i`` of ``rot/2`` has base frequency
  ``f_i = base^(-2i/rot)``, which turns ``L f_i / 2 pi`` times over the original context.
  Pairs turning more than ``beta_fast`` times keep ``f_i`` (extrapolation), pairs turning
  fewer than ``beta_slow`` times get ``f_i / factor`` (interpolation), and between them a
  linear ramp over the pair index blends the two. The ramp's ends are the pair indices
  ``d(n) = rot * ln(L / (2 pi n)) / (2 ln base)`` for ``n = beta_fast, beta_slow``,
  rounded outwards (floor, ceil) and clipped to ``[0, rot - 1]``::

      ramp_i = clamp((i - low) / (high - low), 0, 1)
      f'_i   = f_i / factor * ramp_i + f_i * (1 - ramp_i)

* cos/sin ("attention temperature" on the rotary part): both times
  ``m(factor, mscale) / m(factor, mscale_all_dim)`` with
  ``m(s, c) = 0.1 c ln(s) + 1`` (1 for ``s <= 1``) when ``mscale`` and ``mscale_all_dim``
  are both non-zero, else ``m(factor, 1)``. Scaling cos and sin scales the rotated query
  and key parts, which is how :class:`~megacore.transformer.multi_latent_attention.MLASelfAttention`
  applies it (:func:`yarn_concentration_factor`).
* Softmax scale: times ``m(factor, mscale_all_dim)^2`` (:func:`yarn_softmax_scale_factor`),
  covering the positionless part of each head too.

Megatron-Core takes the cos/sin factor as ``m(factor, mscale) / m(factor, mscale_all_dim)``
whenever both are set; the two agree except for ``mscale != 1`` with ``mscale_all_dim``
0, where megacore follows ``transformers`` (the reference it is tested against).

Shapes: like :mod:`megacore.transformer.rotary_pos_embedding` (``rot`` rotary channels).
"""

from __future__ import annotations

import math

import torch

from megacore.transformer.rotary_pos_embedding import RotaryEmbedding

__all__ = ["YarnRotaryEmbedding", "yarn_get_mscale", "yarn_scaled_inv_freq",
           "yarn_concentration_factor", "yarn_softmax_scale_factor"]


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's ``m(s, c) = 0.1 c ln(s) + 1`` (1 when ``s <= 1``: no extension)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_concentration_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """The factor on cos and sin (module docstring)."""
    if mscale and mscale_all_dim:
        return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    return yarn_get_mscale(factor)


def yarn_softmax_scale_factor(factor: float, mscale_all_dim: float) -> float:
    """The factor on the attention softmax scale, ``m(factor, mscale_all_dim)^2``."""
    return yarn_get_mscale(factor, mscale_all_dim) ** 2


def _correction_dim(rotations: float, dim: int, base: float, context: int) -> float:
    """The (fractional) pair index whose frequency turns ``rotations`` times in ``context``."""
    return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_scaled_inv_freq(dim: int, base: float, factor: float,
                         original_max_position_embeddings: int, beta_fast: float,
                         beta_slow: float) -> torch.Tensor:
    """YaRN inverse frequencies ``[dim/2]`` (float32) for ``dim`` rotary channels."""
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    low = max(math.floor(_correction_dim(beta_fast, dim, base,
                                         original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base,
                                         original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001  # a step instead of a ramp (as the reference does)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the unscaled frequency
    return interpolation * (1 - keep) + extrapolation * keep


class YarnRotaryEmbedding(RotaryEmbedding):
    """:class:`RotaryEmbedding` with YaRN frequencies (angles only: the cos/sin factor and
    the softmax-scale factor are applied by the attention, see the module docstring).

    Args:
        kv_channels: rotary channels (MLA: ``qk_pos_emb_head_dim``).
        rotary_interleaved: pair neighbouring channels instead of halves.
        rotary_base: base of the frequency ladder.
        scaling_factor: YaRN ``factor`` (context extension ratio).
        original_max_position_embeddings: the pre-extension context ``L``.
        beta_fast, beta_slow: rotation counts bounding the ramp.
    """

    def __init__(self, kv_channels: int, rotary_interleaved: bool = False,
                 rotary_base: float = 10000, scaling_factor: float = 1.0,
                 original_max_position_embeddings: int = 4096, beta_fast: float = 32,
                 beta_slow: float = 1):
        super().__init__(kv_channels, rotary_interleaved=rotary_interleaved,
                         rotary_base=rotary_base)
        inv_freq = yarn_scaled_inv_freq(kv_channels, rotary_base, scaling_factor,
                                        original_max_position_embeddings, beta_fast, beta_slow)
        self.inv_freq.copy_(inv_freq.to(self.inv_freq.device))
