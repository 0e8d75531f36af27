"""FLOPs of one training step of a GPT, the figure behind TFLOP/s and MFU in the logs.

One formula, counting matrix multiplies only (2 FLOPs per multiply-add), forward plus
backward (backward = 2 x forward, so 3 x forward in all). Per token and per layer, the
forward pass costs, with ``h`` hidden, ``np`` query heads, ``ng`` key/value groups,
``hn`` head dim, ``f`` MLP width, ``s`` sequence length::

    QKV projection      2 h hn (np + 2 ng)
    attention           4 s np hn          (scores QK^T and weighted sum; causal masking
                                            is not discounted, as in Megatron)
    output projection   2 np hn h
    MLP                 2 h f (2, or 3 with a gated unit such as SwiGLU) x topk experts
    shared experts      the same with the shared-expert width
    router              2 h E              (MoE layers)

plus the output logits ``2 h V`` once per token. This equals Megatron-LM's
``num_floating_point_operations`` (tested) with the router term added.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["num_floating_point_operations"]


def num_floating_point_operations(*, batch_size: int, seq_length: int, num_layers: int,
                                  hidden_size: int, num_attention_heads: int,
                                  ffn_hidden_size: int, padded_vocab_size: int,
                                  kv_channels: Optional[int] = None,
                                  num_query_groups: Optional[int] = None,
                                  gated_linear_unit: bool = False,
                                  num_experts: Optional[int] = None, moe_router_topk: int = 1,
                                  moe_ffn_hidden_size: Optional[int] = None,
                                  shared_expert_ffn_hidden_size: int = 0,
                                  moe_layer_fraction: float = 1.0) -> float:
    """Training FLOPs (forward + backward) of one global batch of ``batch_size`` samples.

    ``moe_layer_fraction`` is the share of layers that are MoE (``--moe-layer-freq``);
    the others are dense.
    """
    h, s = hidden_size, seq_length
    hn = kv_channels if kv_channels is not None else h // num_attention_heads
    ng = num_query_groups if num_query_groups is not None else num_attention_heads
    mlp_factor = 3 if gated_linear_unit else 2
    attention = 2 * h * hn * (num_attention_heads + 2 * ng) + 4 * s * num_attention_heads * hn \
        + 2 * num_attention_heads * hn * h
    dense_mlp = 2 * h * ffn_hidden_size * mlp_factor
    if num_experts:
        expert_width = moe_ffn_hidden_size if moe_ffn_hidden_size is not None else ffn_hidden_size
        moe_mlp = (2 * h * expert_width * mlp_factor * moe_router_topk
                   + 2 * h * shared_expert_ffn_hidden_size * mlp_factor + 2 * h * num_experts)
        mlp = moe_layer_fraction * moe_mlp + (1 - moe_layer_fraction) * dense_mlp
    else:
        mlp = dense_mlp
    per_token_forward = num_layers * (attention + mlp) + 2 * h * padded_vocab_size
    return 3.0 * batch_size * s * per_token_forward
