"""One vocabulary padding rule; the older names are deprecated aliases of it."""

import pytest

from megacore.deprecation import MegacoreDeprecationWarning
from megacore.models.common.embeddings import padded_vocab_size
from megacore.tokenizers import vocab_size_with_padding
from megacore.vocab_padding import pad_vocab_size


def test_pad_vocab_size():
    assert pad_vocab_size(50257, 128) == 50304  # GPT-2, megacore's run vocabulary
    assert pad_vocab_size(50257, 128, 2) == 50432  # Megatron's rule at tp 2: 197 * 256
    assert pad_vocab_size(61, tensor_model_parallel_size=4) == 64  # the model's tp split
    assert pad_vocab_size(64, 64) == 64 and pad_vocab_size(0, 8) == 0
    with pytest.raises(ValueError, match="must be positive, got 0 \\* 2"):
        pad_vocab_size(10, 0, 2)


def test_old_names_warn_and_agree():
    with pytest.warns(MegacoreDeprecationWarning, match="pad_vocab_size"):
        assert vocab_size_with_padding(6000, 128, 4) == pad_vocab_size(6000, 128, 4) == 6144
    with pytest.warns(MegacoreDeprecationWarning, match="pad_vocab_size"):
        assert padded_vocab_size(61, 2) == pad_vocab_size(61, 1, 2) == 62
