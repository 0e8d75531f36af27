"""Input embedding of a language model: word + learned absolute position, then dropout.

Word embeddings are split over tp by vocabulary rows (``VocabParallelEmbedding``); the
vocabulary is padded to a multiple of tp, and the padding rows are zero and never looked
up. Learned position embeddings are replicated. Output is sequence-first ``[s, b, h]``,
or ``[s/tp, b, h]`` under sequence parallelism: the word lookup is then combined with a
reduce-scatter along the sequence instead of an all-reduce, and the position embeddings
are sliced to this rank's chunk (their gradient is all-gathered back in backward, so
every rank holds the full position-embedding gradient).

Each table is initialized inside its own ``init_rng_scope`` (``"word_embeddings"``,
``"position_embeddings"``), so it is the same for every tp/pp layout; an output layer
tied to the word embeddings on another pipeline stage uses the same scope.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megacore import device
from megacore.deprecation import deprecated
from megacore.parallel_state import ProcessGroupCollection
from megacore.tensor_parallel import (
    VocabParallelEmbedding,
    scatter_to_sequence_parallel_region,
)
from megacore.transformer.dropout import sequence_dropout
from megacore.transformer.initialization import init_rng_scope
from megacore.transformer.module import MegatronModule
from megacore.transformer.transformer_config import TransformerConfig
from megacore.vocab_padding import pad_vocab_size

__all__ = ["LanguageModelEmbedding", "padded_vocab_size", "padded_vocab_init_method"]

WORD_EMBEDDINGS_INIT_KEY = "word_embeddings"


@deprecated(since="0.2.0", removed_in="0.4.0", alternative="megacore.vocab_padding.pad_vocab_size")
def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Smallest multiple of ``tp_size`` that is >= ``vocab_size``."""
    return pad_vocab_size(vocab_size, tensor_model_parallel_size=tp_size)


def padded_vocab_init_method(init_method: Callable, vocab_size: int) -> Callable:
    """Init for a ``[padded_vocab, h]`` master: the first ``vocab_size`` rows exactly as
    ``init_method`` fills a ``[vocab_size, h]`` table, padding rows zero."""

    def init_(master: torch.Tensor) -> torch.Tensor:
        init_method(master[:vocab_size])  # a contiguous prefix: same draws as unpadded
        master[vocab_size:].zero_()
        return master

    return init_


class LanguageModelEmbedding(MegatronModule):
    """Word and position embeddings with dropout.

    Args:
        config: hidden size, dropout, init and parallel settings.
        vocab_size: number of real tokens (padded here to a multiple of tp).
        max_sequence_length: rows of the learned position table.
        position_embedding_type: ``"learned_absolute"`` adds a position table; ``"rope"``
            and ``"none"`` add none (rotary positions are applied inside attention).
        num_tokentypes: rows of a token-type table (BERT segments); 0: none.
        scatter_to_sequence_parallel: produce ``[s/tp, b, h]`` under sequence parallelism.
        pg_collection: process groups (default: ``parallel_state``'s grid).

    forward(input_ids ``[b, s]``, position_ids ``[b, s]``) returns ``[s, b, h]`` (or
    ``[s/tp, b, h]``).
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 position_embedding_type: str = "learned_absolute", num_tokentypes: int = 0,
                 scatter_to_sequence_parallel: bool = True,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config, pg_collection)
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.add_position_embedding = position_embedding_type == "learned_absolute"
        self.sequence_parallel = (config.sequence_parallel and scatter_to_sequence_parallel
                                  and self.tp_size > 1)
        with init_rng_scope(WORD_EMBEDDINGS_INIT_KEY):
            self.word_embeddings = VocabParallelEmbedding(
                pad_vocab_size(vocab_size, tensor_model_parallel_size=self.tp_size),
                config.hidden_size,
                init_method=padded_vocab_init_method(config.init_method, vocab_size),
                config=config, reduce_scatter_embeddings=self.sequence_parallel,
                tp_group=self.tp_group)
        self.position_embeddings = self._replicated_table(
            "position_embeddings", max_sequence_length) if self.add_position_embedding else None
        self.tokentype_embeddings = self._replicated_table(
            "tokentype_embeddings", num_tokentypes) if num_tokentypes > 0 else None

    def _replicated_table(self, key: str, rows: int) -> torch.nn.Embedding:
        table = torch.nn.Embedding(rows, self.config.hidden_size, dtype=self.config.params_dtype,
                                   device=device.current_device())
        if self.config.perform_initialization:
            with init_rng_scope(key), torch.no_grad():
                master = torch.empty(rows, self.config.hidden_size, dtype=torch.float32)
                self.config.init_method(master)
                table.weight.copy_(master)
        return table

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                tokentype_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.sequence_parallel:
            # ids [b, s] -> [s, b]; lookup + reduce-scatter -> [s/tp, b, h]
            embeddings = self.word_embeddings(input_ids.t().contiguous())
        else:
            # [b, s] -> [b, s, h] -> [s, b, h]
            embeddings = self.word_embeddings(input_ids).transpose(0, 1)
        extra = None
        if self.position_embeddings is not None:
            extra = self.position_embeddings(position_ids).transpose(0, 1)  # [s, b, h]
        if self.tokentype_embeddings is not None and tokentype_ids is not None:
            token_types = self.tokentype_embeddings(tokentype_ids).transpose(0, 1)
            extra = token_types if extra is None else extra + token_types
        if extra is not None:
            if self.sequence_parallel:
                extra = scatter_to_sequence_parallel_region(extra, self.tp_group)  # [s/tp, b, h]
            embeddings = embeddings + extra
        embeddings = embeddings.contiguous()
        if self.config.fp32_residual_connection:
            embeddings = embeddings.float()
        return sequence_dropout(embeddings, self.config.hidden_dropout, self.training,
                                tp_size=self.tp_size, tp_rank=self.tp_rank,
                                sequence_parallel=self.sequence_parallel, cp_size=self.cp_size,
                                cp_rank=self.cp_rank, stream="dropout/embedding")
