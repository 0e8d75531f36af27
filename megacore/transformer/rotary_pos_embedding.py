"""Rotary position embeddings (RoPE, Su et al. 2021).

Each pair of channels of a query/key head is rotated by an angle proportional to the
token's position, so ``q_i . k_j`` depends on ``i - j`` only. Pairs are the two halves of
the rotated part of the head (GPT-NeoX, Llama; default) or neighbouring channels
(``rotary_interleaved``, GPT-J). With ``rotary_percent < 1`` only the first
``rotary_percent * hn`` channels rotate; the rest pass through.

Llama 3.1+ frequency scaling (``rope_scaling``, Megatron's ``--use-rope-scaling``): with
wavelengths ``2 pi / f`` and an original context ``L``, frequencies whose wavelength is
shorter than ``L / high_freq_factor`` are kept, those longer than ``L / low_freq_factor``
are divided by ``factor``, and those in between are blended linearly in ``L / wavelength``
(the formula of Meta's reference code and of ``transformers``' ``llama3`` rope type).

Shapes: ``freqs`` ``[s, b or 1, 1, rot]`` (angles, ``rot = rotary_percent * hn``), heads
``[s, b, n, hn]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megacore import device

__all__ = ["RotaryEmbedding", "apply_rotary_pos_emb", "llama3_scaled_inv_freq"]


class RotaryEmbedding(torch.nn.Module):
    """Rotation angles for positions.

    Args:
        kv_channels: head dim ``hn``.
        rotary_percent: fraction of each head that rotates.
        rotary_interleaved: pair neighbouring channels instead of halves.
        seq_len_interpolation_factor: divide positions by this (linear position
            interpolation for longer contexts); None: no interpolation.
        rotary_base: base of the geometric frequency ladder.
        rope_scaling: apply Llama 3.1+ frequency scaling (module docstring).
        rope_scaling_factor: its ``factor``.
        rope_scaling_low_freq_factor, rope_scaling_high_freq_factor: its wavelength
            thresholds, as divisors of the original context.
        rope_scaling_original_max_position_embeddings: its original context ``L``.
    """

    def __init__(self, kv_channels: int, rotary_percent: float = 1.0,
                 rotary_interleaved: bool = False,
                 seq_len_interpolation_factor: Optional[float] = None,
                 rotary_base: int = 10000, rope_scaling: bool = False,
                 rope_scaling_factor: float = 8.0, rope_scaling_low_freq_factor: float = 1.0,
                 rope_scaling_high_freq_factor: float = 4.0,
                 rope_scaling_original_max_position_embeddings: int = 8192):
        super().__init__()
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {rotary_percent}")
        dim = int(kv_channels * rotary_percent)
        if dim % 2:
            raise ValueError(f"rotary dim (kv_channels {kv_channels} * rotary_percent "
                             f"{rotary_percent} = {dim}) must be even")
        self.rotary_interleaved = rotary_interleaved
        self.seq_len_interpolation_factor = seq_len_interpolation_factor
        exponents = torch.arange(0, dim, 2, dtype=torch.float32,
                                 device=device.current_device()) / dim
        inv_freq = 1.0 / (rotary_base ** exponents)
        if rope_scaling:
            inv_freq = llama3_scaled_inv_freq(
                inv_freq, rope_scaling_factor, rope_scaling_low_freq_factor,
                rope_scaling_high_freq_factor, rope_scaling_original_max_position_embeddings)
        # Not a parameter, and not saved: it is a pure function of the constructor args.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        positions = positions.to(self.inv_freq.device, self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            positions = positions / self.seq_len_interpolation_factor
        freqs = positions.unsqueeze(-1) * self.inv_freq  # [..., rot/2]
        if self.rotary_interleaved:
            # [..., rot/2] -> [..., rot/2, 2] -> [..., rot]: f0 f0 f1 f1 ...
            return freqs.unsqueeze(-1).expand(*freqs.shape, 2).flatten(-2)
        return torch.cat((freqs, freqs), dim=-1)  # f0 f1 ... f0 f1 ...

    def forward(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """Angles for positions ``offset .. offset + max_seq_len - 1``: ``[s, 1, 1, rot]``."""
        positions = torch.arange(offset, offset + max_seq_len, device=self.inv_freq.device)
        return self._angles(positions)[:, None, None, :]

    def for_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Angles for explicit positions ``[b, s]``: ``[s, b, 1, rot]``."""
        return self._angles(position_ids.t())[:, :, None, :]


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                           high_freq_factor: float, original_max_position_embeddings: int
                           ) -> torch.Tensor:
    """Llama 3.1+ scaling of inverse frequencies ``[rot/2]`` (see the module docstring)."""
    if not factor > 0 or not low_freq_factor < high_freq_factor:
        raise ValueError(f"rope scaling needs factor > 0 and low_freq_factor "
                         f"({low_freq_factor}) < high_freq_factor ({high_freq_factor})")
    context = original_max_position_embeddings
    low_wavelen, high_wavelen = context / low_freq_factor, context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    # [..., rot/2, 2] -> [..., rot]: -x1' x0' -x3' x2' ...
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor,
                         rotary_interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``rot`` channels of ``t`` ``[s, b, n, hn]`` by ``freqs``
    ``[s, b or 1, 1, rot]``; the remaining channels pass through."""
    rot = freqs.size(-1)
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    freqs = freqs.to(t.device)  # no-op when already there (the model keeps them together)
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    t_rot = t_rot * cos + _rotate_half(t_rot, rotary_interleaved) * sin
    if t_pass.size(-1) == 0:
        return t_rot
    return torch.cat((t_rot, t_pass), dim=-1)
