"""TikTokenizer against megatron-core's own tiktoken tokenizer (the real thing) on a tiny
vocabulary in Megatron-LM's JSON format: same ids for both split patterns, special ids,
and errors that name the file and entry."""

import base64
import json

import pytest

from megacore.tokenizers import TikTokenizer, build_tokenizer

TEXTS = ["the cat sat on the mat", "Then THE theme\n\nthere 12345 ok?", "ünïcödé the end",
         "x</s>y"]
MERGES = [b"th", b"he", b"the", b" t", b" th", b" the", b"in", b"at", b" c", b" cat", b"en"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    tokens = [bytes([i]) for i in range(256)] + MERGES
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(),
                "token_str": t.decode("utf-8", errors="replace")} for i, t in enumerate(tokens)]
    path = tmp_path_factory.mktemp("tiktoken") / "vocab.json"
    path.write_text(json.dumps(entries))
    return str(path), len(tokens)


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_ids_equal_megatron_core(vocab, pattern):
    pytest.importorskip("tiktoken")
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import TikTokenTokenizer

    path, n = vocab
    ours = TikTokenizer(path, pattern=pattern, vocab_size=n + 1000)
    theirs = TikTokenTokenizer(path, pattern=pattern, vocab_size=n + 1000,
                               num_special_tokens=1000)
    for text in TEXTS:
        ids = ours.tokenize(text)
        assert ids == theirs.text_to_ids(text), text
        assert ours.detokenize(ids) == text
    assert (ours.eod, ours.bos, ours.pad) == (theirs.eod, theirs.bos_id, 4)
    assert ours.tokenize("the") == [1000 + 256 + MERGES.index(b"the")]
    built = build_tokenizer("TikTokenizer", tokenizer_model=path, vocab_size=n + 1000,
                            tiktoken_pattern=pattern)
    assert built.tokenize(TEXTS[1]) == ours.tokenize(TEXTS[1])
    assert built.padded_vocab_size % 128 == 0 and built.vocab_size == n + 1000


def test_bad_vocabulary_names_file_and_entry(vocab, tmp_path):
    path, n = vocab
    with pytest.raises(ValueError, match=r"vocab\.json: 267 entries, but --vocab-size needs"):
        TikTokenizer(path, vocab_size=n + 2000)
    entries = json.loads(open(path).read())
    entries[260]["rank"] = 7
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"bad\.json: entry 260 must have rank 260"):
        TikTokenizer(str(bad), vocab_size=n + 1000)
    with pytest.raises(ValueError, match="v1 or v2"):
        TikTokenizer(path, pattern="v3", vocab_size=n + 1000)
