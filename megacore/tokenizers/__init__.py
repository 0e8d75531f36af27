"""Tokenizers with Megatron's interface, all loaded from local files.

``build_tokenizer("GPT2BPETokenizer", vocab_file=..., merge_file=...)`` is the usual
entry point; the classes can also be built directly. Nothing here touches the network
or the model stack.
"""

from megacore.tokenizers.bert_wordpiece import BertWordPieceTokenizer
from megacore.tokenizers.build import (
    TOKENIZER_TYPES,
    build_tokenizer,
    vocab_size_with_padding,
)
from megacore.tokenizers.chat_template import (
    ChatTemplateError,
    find_chat_template,
    render_chat_template,
)
from megacore.tokenizers.gpt2_bpe import GPT2BPETokenizer
from megacore.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer
from megacore.tokenizers.megatron_tokenizer import MegatronTokenizer
from megacore.tokenizers.null_tokenizer import NullTokenizer
from megacore.tokenizers.sentencepiece_tokenizer import (
    GPTSentencePieceTokenizer,
    Llama2Tokenizer,
    SentencePieceTokenizer,
)
from megacore.tokenizers.tiktoken_tokenizer import TikTokenizer

__all__ = [
    "BertWordPieceTokenizer",
    "ChatTemplateError",
    "GPT2BPETokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "MegatronTokenizer",
    "TikTokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "TOKENIZER_TYPES",
    "build_tokenizer",
    "find_chat_template",
    "render_chat_template",
    "vocab_size_with_padding",
]
