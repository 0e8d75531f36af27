"""GPTDataset: sample order against a token-level reference of docs/ARCHITECTURE.md
(section 2, step 3),
masks, padding, and the on-disk index cache (including rank 0 building for 2 ranks)."""

import os

import numpy as np
import pytest
import torch

from megacore.datasets import GPTDataset, GPTDatasetConfig, IndexedDataset, Split
from megacore.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megacore.datasets.gpt_dataset import get_ltor_masks_and_position_ids
from megacore.datasets.indexed_dataset import IndexedDatasetBuilder
from tests.multirank import run_distributed

EOD = 0


class StubTokenizer:
    """Just what the datasets read: eod, vocab size, an identity for cache keys."""

    eod = EOD
    vocab_size = 1000
    unique_identifiers = {"class": "StubTokenizer"}

    @property
    def pad(self):
        raise NotImplementedError


def make_corpus(path, num_docs=40, seed=0, max_len=30):
    """Documents of random ids in [1, 999] ending with EOD; returns (prefix, documents)."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(1, 1000, size=rng.integers(1, max_len)), EOD)
            for _ in range(num_docs)]
    prefix = str(path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix, docs


def config(tmp_path, **overrides):
    fields = dict(random_seed=1234, sequence_length=16, blend=None, split="969,30,1",
                  path_to_cache=str(tmp_path / "cache"), tokenizer=StubTokenizer(),
                  create_attention_mask=False)
    fields.update(overrides)
    if fields["blend"] is None and not fields.get("mock") and not fields.get("blend_per_split"):
        fields["blend"] = ([str(tmp_path / "corpus_text_document")], None)
    return GPTDatasetConfig(**fields)


def reference_windows(docs, indices, num_samples, seq_length, seed):
    """docs/ARCHITECTURE.md (section 2, step 3) written out on the token stream: every
    sample of the split."""
    tokens_per_epoch = sum(len(docs[i]) for i in indices)
    epochs = 1
    if num_samples is not None:
        while epochs * tokens_per_epoch < num_samples * seq_length + 1:
            epochs += 1
    per_epoch = (tokens_per_epoch - 1) // seq_length
    before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
    separate = epochs > 1 and (num_samples - before_final) < int(0.8 * per_epoch)
    state = np.random.RandomState(seed)
    if separate:
        first = np.array(list(indices) * (epochs - 1), dtype=np.int32)
        state.shuffle(first)
        last = np.array(list(indices), dtype=np.int32)
        state.shuffle(last)
        order = np.concatenate([first, last])
    else:
        order = np.array(list(indices) * epochs, dtype=np.int32)
        state.shuffle(order)
    stream = np.concatenate([docs[d] for d in order])
    total = (epochs * tokens_per_epoch - 1) // seq_length
    windows = [stream[k * seq_length:k * seq_length + seq_length + 1] for k in range(total)]
    if separate:
        head = np.arange(before_final, dtype=np.uint32)
        state.shuffle(head)
        tail = np.arange(before_final, total, dtype=np.uint32)
        state.shuffle(tail)
        permutation = np.concatenate([head, tail])
    else:
        permutation = np.arange(total, dtype=np.uint32)
        state.shuffle(permutation)
    return [windows[p] for p in permutation]


def build_split(tmp_path, index_split=Split.train, num_samples=None, **overrides):
    cfg = config(tmp_path, **overrides)
    prefix = cfg.blend[0][0]
    ds = IndexedDataset(prefix)
    n = len(ds)
    bookends = {Split.train: (0, 0.969), Split.valid: (0.969, 0.999)}[index_split]
    begin, end = round(bookends[0] * n), round(bookends[1] * n)
    indices = np.arange(begin, end, dtype=np.int32)
    return GPTDataset(ds, prefix, indices, num_samples, index_split, cfg), indices


# With this corpus an epoch of the train split is 594 tokens = 37 samples: 10 fits one
# epoch; 95 and 130 need a last epoch supplying < 80% of an epoch (shuffled apart); 105
# needs 3 epochs whose last supplies 31 >= 0.8 * 37 samples (shuffled together).
@pytest.mark.parametrize("num_samples", [None, 10, 95, 105, 130])
def test_samples_match_the_token_level_reference(tmp_path, num_samples):
    _, docs = make_corpus(tmp_path)
    dataset, indices = build_split(tmp_path, num_samples=num_samples)
    expected = reference_windows(docs, indices, num_samples, 16, 1234)
    assert len(dataset) == len(expected)
    assert num_samples is None or len(dataset) >= num_samples
    for i in range(len(dataset)):
        sample = dataset[i]
        np.testing.assert_array_equal(sample["tokens"].numpy(), expected[i][:-1])
        np.testing.assert_array_equal(sample["labels"].numpy(), expected[i][1:])
        assert sample["tokens"].dtype == torch.int64
        assert sample["loss_mask"].tolist() == [1.0] * 16
        assert sample["position_ids"].tolist() == list(range(16))
        assert "attention_mask" not in sample


def test_separate_final_epoch_case_is_exercised(tmp_path):
    _, docs = make_corpus(tmp_path)
    for num_samples, separate in ((95, True), (105, False)):
        dataset, indices = build_split(tmp_path, num_samples=num_samples)
        epoch_tokens = sum(len(docs[i]) for i in indices)
        assert epoch_tokens == 594
        assert len(dataset.document_index) == 3 * len(indices)
        last_epoch = sorted(dataset.document_index[-len(indices):].tolist())
        # A separated last epoch is a permutation of the split on its own.
        assert (last_epoch == list(indices)) == separate


def test_sample_order_equals_megatron_core(tmp_path):
    """Optional: the same three index arrays as megatron-core's GPTDataset."""
    pytest.importorskip("megatron.core.datasets.gpt_dataset", reason="megatron-core missing")
    from megatron.core.datasets import gpt_dataset as mcore
    from megatron.core.datasets.indexed_dataset import IndexedDataset as McoreIndexed
    from megatron.core.datasets.utils import Split as McoreSplit

    make_corpus(tmp_path)
    ours, indices = build_split(tmp_path, num_samples=130)
    prefix = str(tmp_path / "corpus_text_document")
    cfg = mcore.GPTDatasetConfig(
        random_seed=1234, sequence_length=16, blend=([prefix], None), split="969,30,1",
        path_to_cache=str(tmp_path / "mcore_cache"), tokenizer=StubTokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    theirs = mcore.GPTDataset(McoreIndexed(prefix), prefix, indices, 130, McoreSplit.train, cfg)
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    for i in (0, 7, 129):
        np.testing.assert_array_equal(ours[i]["tokens"].numpy(), theirs[i]["tokens"].numpy())


def test_masks_and_position_ids():
    tokens = torch.tensor([5, 6, EOD, 7, 8, EOD, 9])
    mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
        tokens, EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True,
        create_attention_mask=True)
    assert position_ids.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert loss_mask.tolist() == [1, 1, 0, 1, 1, 0, 1]
    allowed = ~mask[0]  # True = may attend
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for start, end in ((0, 3), (3, 6), (6, 7)):
        for q in range(start, end):
            expected[q, start:q + 1] = True
    assert torch.equal(allowed, expected)
    mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
        tokens, EOD, False, False, False, True)
    assert torch.equal(~mask[0], torch.tril(torch.ones(7, 7, dtype=torch.bool)))
    assert position_ids.tolist() == list(range(7)) and loss_mask.tolist() == [1.0] * 7


def test_dataset_options_reach_the_samples(tmp_path):
    _, docs = make_corpus(tmp_path)
    dataset, indices = build_split(tmp_path, reset_position_ids=True, eod_mask_loss=True,
                                   create_attention_mask=True)
    expected = reference_windows(docs, indices, None, 16, 1234)
    for i in range(5):
        sample = dataset[i]
        tokens = expected[i][:-1]
        assert sample["attention_mask"].shape == (1, 16, 16)
        assert sample["loss_mask"].tolist() == [0.0 if t == EOD else 1.0 for t in tokens]
        eods = [p for p, t in enumerate(tokens) if t == EOD]
        starts = [0] + [p + 1 for p in eods]
        want = [p - max(s for s in starts if s <= p) for p in range(16)]
        assert sample["position_ids"].tolist() == want
    assert torch.equal(dataset[None]["loss_mask"], torch.zeros(16))


def test_partial_validation_sample_is_padded(tmp_path):
    _, docs = make_corpus(tmp_path, num_docs=400)
    dataset, indices = build_split(tmp_path, index_split=Split.valid,
                                   drop_last_partial_validation_sequence=False)
    stream = np.concatenate([docs[d] for d in dataset.document_index])
    last = dataset[int(np.argmax(dataset.shuffle_index == len(dataset) - 1))]
    have = len(stream) - (len(dataset) - 1) * 16  # tokens left for the final window
    assert 1 < have <= 16
    assert last["loss_mask"].tolist() == [1.0] * (have - 1) + [0.0] * (17 - have)
    np.testing.assert_array_equal(last["tokens"][:have].numpy(),
                                  stream[-have:])
    assert last["tokens"][have:].tolist() == [0] * (16 - have)  # pad -1 -> id 0


def test_add_extra_token_off(tmp_path):
    _, docs = make_corpus(tmp_path)
    dataset, indices = build_split(tmp_path, add_extra_token_to_sequence=False)
    sample = dataset[0]
    window = int(dataset.shuffle_index[0])
    stream = np.concatenate([docs[d] for d in dataset.document_index])
    np.testing.assert_array_equal(sample["tokens"].numpy(), stream[window * 16:window * 16 + 16])
    assert sample["loss_mask"][-1] == 0 and sample["labels"][-1] == 0


# ----------------------------------------------------------------- the index cache

def test_cache_is_reused_and_keyed_by_config(tmp_path):
    make_corpus(tmp_path)
    first, _ = build_split(tmp_path, num_samples=50)
    assert first.built_anew_on_cache_miss
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 4 and all(f.endswith(("-GPTDataset-train-description.txt",
                                               "-GPTDataset-train-document_index.npy",
                                               "-GPTDataset-train-sample_index.npy",
                                               "-GPTDataset-train-shuffle_index.npy"))
                                   for f in files)
    assert len({f.split("-")[0] for f in files}) == 1  # one hash
    again, _ = build_split(tmp_path, num_samples=50)
    assert not again.built_anew_on_cache_miss
    np.testing.assert_array_equal(again.shuffle_index, first.shuffle_index)
    np.testing.assert_array_equal(again.sample_index, first.sample_index)
    for change in ({"random_seed": 1}, {"sequence_length": 8}, {"split": "90,10,0"}):
        other, _ = build_split(tmp_path, num_samples=50, **change)
        assert other.built_anew_on_cache_miss, change
    other, _ = build_split(tmp_path, num_samples=51)
    assert other.built_anew_on_cache_miss
    assert len(os.listdir(tmp_path / "cache")) == 4 * 5


def test_incomplete_cache_is_rebuilt(tmp_path):
    make_corpus(tmp_path)
    first, _ = build_split(tmp_path)
    description = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".txt")][0]
    os.remove(tmp_path / "cache" / description)  # as if the writer died before the end
    again, _ = build_split(tmp_path)
    assert again.built_anew_on_cache_miss


def test_default_cache_location(tmp_path):
    make_corpus(tmp_path)
    dataset, _ = build_split(tmp_path, path_to_cache=None)
    assert dataset.built_anew_on_cache_miss
    assert len(os.listdir(tmp_path / "cache" / "GPTDataset_indices")) == 4


def _build_on_two_ranks(tmp_dir):
    cfg = config_for_ranks(tmp_dir)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [60, 5, None], lambda: True,
                                                    cfg).build()
    return {"rank": torch.distributed.get_rank(),
            "built": [train.built_anew_on_cache_miss, valid.built_anew_on_cache_miss],
            "tokens": [train[i]["tokens"].tolist() for i in range(len(train))]}


def config_for_ranks(tmp_dir):
    import pathlib

    return config(pathlib.Path(tmp_dir))


def test_rank_zero_builds_the_cache_and_rank_one_loads_it(tmp_path):
    make_corpus(tmp_path)
    results = run_distributed(_build_on_two_ranks, world_size=2, args=(str(tmp_path),))
    assert results[0]["built"] == [True, True]
    assert results[1]["built"] == [False, False]  # loaded what rank 0 wrote
    assert results[0]["tokens"] == results[1]["tokens"]
    single = _single_process_tokens(tmp_path)
    assert results[0]["tokens"] == single
    results = run_distributed(_build_on_two_ranks, world_size=2, args=(str(tmp_path),))
    assert [r["built"] for r in results] == [[False, False], [False, False]]


def _single_process_tokens(tmp_path):
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [60, 5, None], lambda: True,
        config(tmp_path, path_to_cache=str(tmp_path / "single_cache"))).build()
    return [train[i]["tokens"].tolist() for i in range(len(train))]
