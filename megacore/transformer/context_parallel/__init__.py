"""Context parallelism: the sequence split over cp ranks and ring attention across them.

See :mod:`.sequence_split` for the load-balanced layout (rank ``i`` holds chunks ``i`` and
``2cp-1-i`` of ``2cp``), :mod:`.ring_attention` for exact attention over it, and
:mod:`.core_attention` for how ``DotProductAttention`` uses it when
``config.context_parallel_size > 1``.
"""

from megacore.transformer.context_parallel.core_attention import (
    context_parallel_core_attention,
)
from megacore.transformer.context_parallel.keyed_dropout import (
    attention_dropout_keep_mask,
)
from megacore.transformer.context_parallel.loss_reduction import (
    masked_token_mean_over_cp,
)
from megacore.transformer.context_parallel.ring_attention import (
    FusedRingAttentionFunction,
    RingAttentionFunction,
    RingBlock,
    ring_attention,
    ring_block_plan,
    ring_source_rank,
)
from megacore.transformer.context_parallel.sequence_split import (
    cp_chunk_ids,
    gather_from_context_parallel_ranks,
    get_batch_on_this_cp_rank,
    get_position_ids_on_cp_rank,
    merge_batch_from_cp_ranks,
    merge_cp_shards,
    split_for_cp_rank,
)

__all__ = [
    "context_parallel_core_attention",
    "attention_dropout_keep_mask",
    "masked_token_mean_over_cp",
    "ring_attention",
    "RingAttentionFunction",
    "FusedRingAttentionFunction",
    "RingBlock",
    "ring_block_plan",
    "ring_source_rank",
    "cp_chunk_ids",
    "get_position_ids_on_cp_rank",
    "split_for_cp_rank",
    "merge_cp_shards",
    "get_batch_on_this_cp_rank",
    "merge_batch_from_cp_ranks",
    "gather_from_context_parallel_ranks",
]
