"""``MLAConfig``: the multi-latent-attention fields of a transformer config (Megatron-Core's
names, so ``--multi-latent-attention --q-lora-rank ...`` port unchanged). See
:mod:`megacore.transformer.multi_latent_attention` for what each width does."""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["MLAConfig"]


@dataclasses.dataclass
class MLAConfig:
    """Multi-latent attention (DeepSeek-V2/V3). Off unless ``multi_latent_attention``."""

    multi_latent_attention: bool = False
    """Use multi-latent attention instead of multi-head/grouped-query attention (needs
    RoPE position embeddings; heads have no key/value groups)."""

    q_lora_rank: Optional[int] = None
    """Width of the query latent (DeepSeek-V3: 1536). None: queries are projected from
    the hidden state directly (DeepSeek-V2-Lite)."""

    kv_lora_rank: int = 512
    """Width of the key/value latent, the part of a token that generation caches."""

    qk_head_dim: int = 128
    """Per-head width of the query/key part without position (``qk_nope_head_dim``)."""

    qk_pos_emb_head_dim: int = 64
    """Per-head width of the rotary query/key part (the key's is shared by all heads)."""

    v_head_dim: int = 128
    """Per-head width of the values."""

    rope_type: str = "rope"
    """Rotary embedding of the decoupled query/key part: ``rope`` (plain) or ``yarn``
    (YaRN context extension, DeepSeek-V2/V3; the fields below, see
    :mod:`megacore.transformer.yarn_rotary_pos_embedding`). Megatron-Core's MLA config
    defaults to ``yarn``; megacore keeps ``rope`` so that configs without the flag mean
    what they meant before. Needs ``multi_latent_attention``."""

    rotary_scaling_factor: float = 1.0
    """YaRN ``factor``: how many times the original context is extended (DeepSeek-V3: 40).
    Scales the low frequencies, cos/sin and the softmax scale."""

    original_max_position_embeddings: int = 4096
    """YaRN: the context length the model was first trained on (DeepSeek-V3: 4096)."""

    beta_fast: float = 32
    """YaRN: rotary pairs turning more than this many times over the original context
    keep their frequency (DeepSeek-V3: 32)."""

    beta_slow: float = 1
    """YaRN: rotary pairs turning fewer than this many times are interpolated fully
    (frequency / factor); a linear ramp between the two (DeepSeek-V3: 1)."""

    mscale: float = 1.0
    """YaRN: numerator coefficient of the cos/sin factor
    ``m(factor, mscale) / m(factor, mscale_all_dim)``, ``m(s, c) = 0.1 c ln s + 1``."""

    mscale_all_dim: float = 0.0
    """YaRN: denominator coefficient of the cos/sin factor, and the softmax scale is
    multiplied by ``m(factor, mscale_all_dim)^2`` (0: neither; DeepSeek-V3: 1)."""

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.rope_type not in ("rope", "yarn"):
            raise ValueError(f"rope_type must be 'rope' or 'yarn', got {self.rope_type!r}")
        if self.rope_type == "yarn":
            self._check_yarn()
        if not self.multi_latent_attention:
            return
        for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.qk_pos_emb_head_dim % 2:
            raise ValueError(f"qk_pos_emb_head_dim must be even (rotary pairs), got "
                             f"{self.qk_pos_emb_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"q_lora_rank must be None or positive, got {self.q_lora_rank}")
        heads, groups = getattr(self, "num_attention_heads", None), \
            getattr(self, "num_query_groups", None)
        if groups is not None and groups != heads:
            raise ValueError("multi_latent_attention has no key/value groups: drop "
                             "num_query_groups (--group-query-attention)")

    def _check_yarn(self) -> None:
        if not self.multi_latent_attention:
            raise ValueError("rope_type 'yarn' is implemented for multi-latent attention only "
                             "(--rope-type yarn needs --multi-latent-attention)")
        for name in ("rotary_scaling_factor", "original_max_position_embeddings",
                     "beta_fast", "beta_slow"):
            if not getattr(self, name) > 0:
                raise ValueError(f"rope_type 'yarn' needs {name} > 0, got "
                                 f"{getattr(self, name)!r}")
