"""``MLAConfig``: the multi-latent-attention fields of a transformer config (Megatron-Core's
names, so ``--multi-latent-attention --q-lora-rank ...`` port unchanged). See
:mod:`megacore.transformer.multi_latent_attention` for what each width does."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megacore.config_error import FieldError

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

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if not self.multi_latent_attention:
            return
        for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FieldError(f"{name} must be a positive integer, got {value!r}", name)
        if self.qk_pos_emb_head_dim % 2:
            raise FieldError(f"qk_pos_emb_head_dim must be even (rotary pairs), got "
                             f"{self.qk_pos_emb_head_dim}", "qk_pos_emb_head_dim")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise FieldError(f"q_lora_rank must be None or positive, got {self.q_lora_rank}",
                             "q_lora_rank")
        heads, groups = getattr(self, "num_attention_heads", None), \
            getattr(self, "num_query_groups", None)
        if groups is not None and groups != heads:
            raise FieldError("multi_latent_attention has no key/value groups: drop "
                             "num_query_groups (--group-query-attention)",
                             "multi_latent_attention", "num_query_groups")
