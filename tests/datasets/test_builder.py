"""--data-path / --split parsing, the dataset builder's cases, blending and mock data."""

import logging
import os

import numpy as np
import pytest

from megacore.datasets import (
    BlendedDataset,
    BlendedMegatronDatasetBuilder,
    GPTDataset,
    GPTDatasetConfig,
    MockGPTDataset,
    get_blend_from_list,
    parse_and_normalize_split,
)
from megacore.datasets.split_and_blend import convert_split_vector_to_split_matrix
from tests.datasets.test_gpt_dataset import StubTokenizer, config, make_corpus


def test_parse_split():
    assert parse_and_normalize_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_and_normalize_split("99,1") == pytest.approx([0.99, 0.01, 0.0])
    assert parse_and_normalize_split("1/1/2") == pytest.approx([0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match=r"--split 'a,b': expected up to 3"):
        parse_and_normalize_split("a,b")
    with pytest.raises(ValueError, match=r"expected 1 to 3 numbers, got 4"):
        parse_and_normalize_split("1,2,3,4")
    with pytest.raises(ValueError, match=r"not all zero"):
        parse_and_normalize_split("0,0,0")
    assert convert_split_vector_to_split_matrix([0.5, 0.0, 0.5]) == [(0, 0.5), None, (0.5, 1.0)]


def test_blend_from_list():
    assert get_blend_from_list(["data/a"]) == (["data/a"], None)
    assert get_blend_from_list("data/a data/b") == (["data/a", "data/b"], None)
    prefixes, weights = get_blend_from_list(["0.3", "data/a", "0.9", "data/b"])
    assert prefixes == ["data/a", "data/b"] and weights == pytest.approx([0.25, 0.75])
    assert get_blend_from_list("3 a 1 b")[1] == pytest.approx([0.75, 0.25])
    assert get_blend_from_list(None) is None and get_blend_from_list([]) is None
    with pytest.raises(ValueError, match="not a mixture"):
        get_blend_from_list(["0.3", "data/a", "data/b"])
    with pytest.raises(ValueError, match="two numbers in a row"):
        get_blend_from_list(["0.3", "0.5", "1", "data/b"])


def _two_corpora(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, docs_a = make_corpus(tmp_path / "a", num_docs=60, seed=1)
    b, docs_b = make_corpus(tmp_path / "b", num_docs=60, seed=2)
    return a, b


def test_single_prefix_gives_three_splits(tmp_path):
    make_corpus(tmp_path, num_docs=200)
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [40, 5, 2], lambda: True, config(tmp_path, split="90,8,2")).build()
    assert [type(d) for d in (train, valid, test)] == [GPTDataset] * 3
    assert len(train) >= 40 and len(valid) >= 5 and len(test) >= 2
    assert list(train.indices[[0, -1]]) == [0, 179] and list(valid.indices[[0, -1]]) == [180, 195]


def test_empty_split_with_samples_requested_names_split_and_path(tmp_path):
    prefix, _ = make_corpus(tmp_path)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [10, 5, None], lambda: True,
                                            config(tmp_path, split="100,0,0"))
    with pytest.raises(ValueError, match=rf"the valid split of {prefix} is empty \(--split "
                                         rf"100,0,0 gives it sequences \[0, 0\) of 40\) but 5"):
        builder.build()
    # A split of positive weight that rounds to no sequences is just as empty.
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [10, 0, 3], lambda: True,
                                            config(tmp_path, split="98,1,1"))
    with pytest.raises(ValueError, match=r"the test split of .* is empty .*\[40, 40\) of 40"):
        builder.build()
    # Nothing requested: no dataset, no error.
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [10, None, None], lambda: True, config(tmp_path, split="100,0,0")).build()
    assert valid is None and test is None and len(train) >= 10


def test_weighted_blend(tmp_path, caplog):
    a, b = _two_corpora(tmp_path)
    cfg = config(tmp_path, blend=get_blend_from_list(f"1 {a} 3 {b}"), split="90,10,0")
    with caplog.at_level(logging.INFO, logger="megacore.datasets.blended_dataset"):
        train, valid, test = BlendedMegatronDatasetBuilder(
            GPTDataset, [100, 10, None], lambda: True, cfg).build()
    assert isinstance(train, BlendedDataset) and test is None
    assert "normalized weights" in caplog.text and "0.250000" in caplog.text \
        and "0.750000" in caplog.text
    assert len(train) == 25 + 75  # sum of ceil(size * weight)
    counts = np.bincount(train.dataset_index, minlength=2)
    assert counts.tolist() == [25, 75]
    for i in (0, 1, 2, 50, 99):
        sample = train[i]
        d, k = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        assert sample["dataset_id"] == d
        assert sample["tokens"].tolist() == train.datasets[d][k]["tokens"].tolist()
    # Built with the surplus: each part has a margin over what the blend takes.
    assert len(train.datasets[0]) >= int(np.ceil(100 * 0.25 * 1.005))
    again = BlendedMegatronDatasetBuilder(GPTDataset, [100, 10, None], lambda: True,
                                          cfg).build()[0]
    assert not again.built_anew_on_cache_miss and train.built_anew_on_cache_miss
    np.testing.assert_array_equal(again.dataset_index, train.dataset_index)


def test_unweighted_prefixes_blend_exhaustively(tmp_path):
    a, b = _two_corpora(tmp_path)
    cfg = config(tmp_path, blend=get_blend_from_list([a, b]), split="1,0,0")
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True,
                                                cfg).build()
    assert len(train) == len(train.datasets[0]) + len(train.datasets[1])
    for d in range(2):
        picked = train.dataset_sample_index[train.dataset_index == d]
        assert picked.tolist() == list(range(len(train.datasets[d])))


def test_oversampling_is_an_error(tmp_path):
    a, b = _two_corpora(tmp_path)
    cfg = config(tmp_path, blend=([a, b], None), split="1,0,0")
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True,
                                                cfg).build()
    parts = train.datasets
    weighted = config(tmp_path, blend=([a, b], [0.5, 0.5]), split="1,0,0")
    with pytest.raises(ValueError, match="weighted --data-path needs a sample count for the "
                                         "train split"):
        BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True,
                                      weighted).build()
    with pytest.raises(IndexError, match=r"takes \d+ samples from dataset 0 .* which has"):
        BlendedDataset(parts, [0.9, 0.1], 3 * len(parts[0]), cfg)


def test_separate_paths_per_split(tmp_path):
    a, b = _two_corpora(tmp_path)
    cfg = config(tmp_path, blend=None, split=None,
                 blend_per_split=[([a], None), ([b], None), None])
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [20, 4, None], lambda: True,
                                                       cfg).build()
    assert train.dataset_path == a and valid.dataset_path == b and test is None
    assert len(train.indices) == 60 and len(valid.indices) == 60
    with pytest.raises(ValueError, match="3 test samples were requested but no test data"):
        BlendedMegatronDatasetBuilder(GPTDataset, [20, 4, 3], lambda: True, cfg).build()


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match="needs split"):
        config(tmp_path, split=None)
    with pytest.raises(ValueError, match="no data"):
        GPTDatasetConfig(random_seed=1, sequence_length=4, tokenizer=StubTokenizer())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        config(tmp_path, tokenizer=None)


def test_mock_data(tmp_path):
    cfg = config(tmp_path, blend=None, mock=True, path_to_cache=None)
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [8, 2, 2], lambda: True,
                                                       cfg).build()
    assert isinstance(train, MockGPTDataset) and len(train) >= 8
    low = train.dataset
    position, offset = (int(v) for v in train.sample_index[int(train.shuffle_index[3])])
    stream = np.concatenate([low[int(d)] for d in train.document_index[position:position + 3]])
    assert train[3]["tokens"].tolist() == stream[offset:offset + 16].tolist()
    # sequence i is 1, 2, ..., n-1 (mod the vocabulary size) then eod
    expected = [i % StubTokenizer.vocab_size for i in range(1, int(low.sequence_lengths[0]))]
    assert low[0].tolist() == expected + [0]
    assert not os.path.exists(tmp_path / "cache")
