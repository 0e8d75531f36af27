"""BERT WordPiece, SentencePiece, Hugging Face tokenizer.json and Null tokenizers against
their reference libraries, all from local files built in the test."""

import io
import json
import os

import pytest

from megacore.tokenizers import (
    BertWordPieceTokenizer,
    GPTSentencePieceTokenizer,
    HuggingFaceTokenizer,
    Llama2Tokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CORPUS = os.path.join(ROOT, "examples", "data", "demo_corpus.jsonl")

SAMPLES = [
    "Return the Unicode normalization form of the string.",
    "Héllo WÖRLD, naïve café! Ünïcödé accents are stripped when lower-casing.",
    "中文字符 are split one by one; so are 日本語 characters.",
    "Punctuation: (a) [b] {c} -- 'quotes' \"double\" end.",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "   spaced\tout\ntext   ",
    "",
]


def _demo_texts(limit):
    with open(DEMO_CORPUS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:limit]


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory):
    from tokenizers import BertWordPieceTokenizer as Trainer

    directory = tmp_path_factory.mktemp("bert")
    trainer = Trainer(lowercase=True)
    trainer.train_from_iterator(_demo_texts(200), vocab_size=1500,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    trainer.save_model(str(directory))
    return str(directory / "vocab.txt")


@pytest.mark.parametrize("lower_case", [True, False])
def test_bert_wordpiece_matches_the_original_bert_tokenizer(bert_vocab, lower_case):
    import transformers

    # The pure-Python original (transformers 5 renamed it; its BertTokenizer is Rust now).
    python_bert = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)
    ours = BertWordPieceTokenizer(bert_vocab, lower_case=lower_case)
    reference = python_bert(bert_vocab, do_lower_case=lower_case)
    for text in SAMPLES + _demo_texts(20):
        expected = reference.convert_tokens_to_ids(reference.tokenize(text))
        assert ours.tokenize(text) == expected, text[:60]
    vocab_lines = sum(1 for _ in open(bert_vocab, encoding="utf-8"))
    assert ours.vocab_size == vocab_lines + 2  # [BOS], [EOS] appended as in Megatron
    assert ours.eod == ours.eos == ours.vocab["[EOS]"] == vocab_lines + 1
    assert (ours.cls, ours.sep, ours.pad, ours.mask) == (2, 3, 0, 4)
    ids = ours.tokenize("return the string")
    assert ours.detokenize(ids) == "return the string"


def test_bert_needs_its_special_tokens(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.txt: BERT vocabulary lacks \[CLS\]"):
        BertWordPieceTokenizer(str(tmp_path / "vocab.txt"))


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_demo_texts(150)), model_writer=model, vocab_size=400,
        model_type="unigram", pad_id=3, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    path.write_bytes(model.getvalue())
    return str(path)


def test_sentencepiece_flavours(sentencepiece_model):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
    gpt = GPTSentencePieceTokenizer(sentencepiece_model)
    llama = Llama2Tokenizer(sentencepiece_model)
    for text in SAMPLES[:5] + _demo_texts(5):
        assert gpt.tokenize(text) == processor.encode_as_ids(text)
        assert llama.tokenize(text) == [processor.bos_id()] + processor.encode_as_ids(text)
    assert gpt.eod == processor.eos_id() and gpt.pad == 3 and gpt.vocab_size == 400
    assert gpt.detokenize(gpt.tokenize("return the value")) == "return the value"


def test_sentencepiece_special_tokens(sentencepiece_model):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
    tokenizer = SentencePieceTokenizer(sentencepiece_model, vocab_extra_ids=2)
    # <CLS> <SEP> <EOD> <MASK> appended, then the model's own pad/bos/eos pieces (already
    # present), then the sentinels.
    assert [tokenizer.cls, tokenizer.sep, tokenizer.eod, tokenizer.mask] == [400, 401, 402, 403]
    assert tokenizer.pad == 3 and tokenizer.vocab_size == 406
    assert tokenizer.vocab["<extra_id_1>"] == 405
    ids = tokenizer.tokenize("first part<SEP>second<extra_id_1>")
    assert ids == (processor.encode_as_ids("first part") + [401]
                   + processor.encode_as_ids("second") + [405])
    assert tokenizer.detokenize(ids) == "first part <SEP> second <extra_id_1> "


def test_huggingface_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(_demo_texts(100), trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>"}, "bos_token": "<s>", "pad_token": "<pad>"}))
    ours = HuggingFaceTokenizer(str(tmp_path))
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in SAMPLES[:5] + _demo_texts(10):
        assert ours.tokenize(text) == reference(text).input_ids
    assert ours.tokenize("hello")[0] == 1  # the tokenizer's own post-processing (<s>)
    assert (ours.eod, ours.bos, ours.pad) == (2, 1, 3) and ours.vocab_size == 800
    assert HuggingFaceTokenizer(str(tmp_path / "tokenizer.json")).tokenize("x y") == \
        ours.tokenize("x y")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        HuggingFaceTokenizer("gpt2")


def test_null_tokenizer_and_build_errors():
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tokenizer.tokenize("5 17 99") == [5, 17, 99]
    assert tokenizer.detokenize([5, 17]) == "5 17"
    assert tokenizer.vocab_size == 101 and tokenizer.eod == 100
    assert tokenizer.padded_vocab_size == 128
    with pytest.raises(NotImplementedError, match="NullTokenizer has no mask token"):
        NullTokenizer(10).mask
    with pytest.raises(ValueError, match="space-separated integers"):
        tokenizer.tokenize("five")
    with pytest.raises(ValueError, match="unknown tokenizer type 'Nope'"):
        build_tokenizer("Nope")
    with pytest.raises(ValueError, match="NullTokenizer needs --vocab-size"):
        build_tokenizer("NullTokenizer")
