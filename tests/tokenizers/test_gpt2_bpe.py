"""GPT2BPETokenizer ids equal GPT-2 BPE references on real text.

The corpus is the bundled demo corpus with its vocabulary (examples/data, PSF licence),
so the suite needs nothing outside the repository. MEGACORE_GPT2_TEST_CORPUS may name
a directory with another sample.jsonl + vocab.json + merges.txt (for example a 50,257-token
GPT-2 vocabulary and its corpus) to run the same comparisons on it.
"""

import json
import os

import pytest

from megacore.tokenizers import GPT2BPETokenizer, build_tokenizer
from megacore.tokenizers.gpt2_bpe import read_merges
from tests.tokenizers.gpt2_reference import ReferenceGPT2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "examples", "data")
CORPUS_DIR = os.environ.get("MEGACORE_GPT2_TEST_CORPUS", DEMO)
CORPUS = os.path.join(CORPUS_DIR, "sample.jsonl" if CORPUS_DIR != DEMO else "demo_corpus.jsonl")

EDGE_CASES = [
    "", " ", "hello world", "Hello  world\n\n\tindented", "it's they're we've I'm you'll he'd",
    "<|endoftext|> stays ordinary text", "numbers 12345 3.14159 1e-9",
    "unicode: café naïve Ünïcödé 日本語の文章 emoji 🎉🚀 combining é",
    "trailing spaces   ", "   leading", "\r\nwindows\r\nlines", "tab\tseparated\tvalues",
    "a" * 500, "x = {'k': [1, 2, 3]}  # code!?", "\u00a0non-breaking\u2009thin",
]


def _texts(path, limit=None):
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:limit]


@pytest.fixture(scope="module")
def corpus_tokenizer():
    return GPT2BPETokenizer(os.path.join(CORPUS_DIR, "vocab.json"),
                            os.path.join(CORPUS_DIR, "merges.txt"))


def test_ids_equal_rust_bpe_on_the_whole_corpus(corpus_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    with open(os.path.join(CORPUS_DIR, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    reference = Tokenizer(models.BPE(vocab=vocab, merges=read_merges(
        os.path.join(CORPUS_DIR, "merges.txt"))))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    texts = _texts(CORPUS)
    assert corpus_tokenizer.backend_name == "tiktoken"
    expected = [reference.encode(t, add_special_tokens=False).ids for t in texts]
    assert [corpus_tokenizer.tokenize(t) for t in texts] == expected
    assert sum(map(len, expected)) > 150_000  # the demo corpus: 172,589 tokens


def test_ids_equal_pure_python_gpt2_on_the_last_documents(corpus_tokenizer):
    reference = ReferenceGPT2(os.path.join(CORPUS_DIR, "vocab.json"),
                              os.path.join(CORPUS_DIR, "merges.txt"))
    # The last 25 documents: the demo-vocabulary test below covers the first 60.
    for text in _texts(CORPUS)[-25:] + EDGE_CASES:
        assert corpus_tokenizer.tokenize(text) == reference.encode(text), text[:80]


def test_demo_vocabulary_on_the_demo_corpus():
    tokenizer = GPT2BPETokenizer(os.path.join(DEMO, "vocab.json"),
                                 os.path.join(DEMO, "merges.txt"))
    reference = ReferenceGPT2(os.path.join(DEMO, "vocab.json"), os.path.join(DEMO, "merges.txt"))
    assert tokenizer.backend_name == "tiktoken"
    assert tokenizer.vocab_size == 6000 and tokenizer.eod == 5999
    assert tokenizer.vocab["<|endoftext|>"] == 5999 and tokenizer.inv_vocab[5999] == "<|endoftext|>"
    for text in _texts(os.path.join(DEMO, "demo_corpus.jsonl"), limit=60) + EDGE_CASES:
        ids = tokenizer.tokenize(text)
        assert ids == reference.encode(text), text[:80]
        assert tokenizer.detokenize(ids) == text
    assert tokenizer.detokenize([5999]) == "<|endoftext|>"


def test_merge_order_mismatch_falls_back_to_merge_ranks(tmp_path):
    """A vocabulary whose merged ids are not in merge order cannot use tiktoken's
    rank-by-id shortcut; the result must still be GPT-2 BPE."""
    with open(os.path.join(DEMO, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    merges = read_merges(os.path.join(DEMO, "merges.txt"))
    a, b = "".join(merges[0]), "".join(merges[1])
    vocab[a], vocab[b] = vocab[b], vocab[a]  # swap ids of the first two merge results
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges_path = os.path.join(DEMO, "merges.txt")
    tokenizer = GPT2BPETokenizer(str(tmp_path / "vocab.json"), merges_path)
    assert tokenizer.backend_name == "tokenizers"
    reference = ReferenceGPT2(str(tmp_path / "vocab.json"), merges_path)
    for text in _texts(os.path.join(DEMO, "demo_corpus.jsonl"), limit=10) + EDGE_CASES:
        assert tokenizer.tokenize(text) == reference.encode(text)


def test_missing_end_of_text_and_bad_merges(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json: no <\|endoftext\|> token"):
        GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    with pytest.raises(ValueError, match=r"merges\.txt:2: expected 'left right'"):
        read_merges(str(tmp_path / "merges.txt"))


def test_merges_without_final_newline_keep_the_last_merge(tmp_path, caplog):
    content = open(os.path.join(DEMO, "merges.txt"), encoding="utf-8").read()
    (tmp_path / "merges.txt").write_text(content.rstrip("\n"), encoding="utf-8")
    assert read_merges(str(tmp_path / "merges.txt")) == read_merges(
        os.path.join(DEMO, "merges.txt"))
    assert "does not end with a newline" in caplog.text


def test_build_tokenizer_pads_the_vocabulary():
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=os.path.join(DEMO, "vocab.json"),
                                merge_file=os.path.join(DEMO, "merges.txt"),
                                make_vocab_size_divisible_by=128, tensor_model_parallel_size=4)
    assert tokenizer.vocab_size == 6000
    assert tokenizer.padded_vocab_size == 6144  # ceil(6000 / 512) * 512
    with pytest.raises(ValueError, match="GPT2BPETokenizer needs --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file="v.json")


def test_cached_tables_give_the_same_tokenizer(tmp_path):
    """Cold build (stores the tables), warm build (loads them), no cache, corrupt cache:
    all four encode and decode identically."""
    vocab, merges = os.path.join(DEMO, "vocab.json"), os.path.join(DEMO, "merges.txt")
    texts = _texts(os.path.join(DEMO, "demo_corpus.jsonl"), limit=30) + EDGE_CASES
    cache = tmp_path / "cache"
    cold = GPT2BPETokenizer(vocab, merges, cache_dir=str(cache))
    stored = list(cache.iterdir())
    assert len(stored) == 1 and stored[0].name.endswith(".npz")
    warm = GPT2BPETokenizer(vocab, merges, cache_dir=str(cache))
    uncached = GPT2BPETokenizer(vocab, merges, cache_dir=None)
    stored[0].write_bytes(b"not an npz file")
    corrupt = GPT2BPETokenizer(vocab, merges, cache_dir=str(cache))
    for tokenizer in (warm, uncached, corrupt):
        assert (tokenizer.eod, tokenizer.vocab_size) == (cold.eod, cold.vocab_size)
        assert tokenizer.backend_name == "tiktoken"
        for text in texts:
            ids = cold.tokenize(text)
            assert tokenizer.tokenize(text) == ids
            assert tokenizer.detokenize(ids + [cold.eod]) == cold.detokenize(ids + [cold.eod])
    assert warm.vocab == uncached.vocab and len(warm.inv_vocab) == warm.vocab_size
