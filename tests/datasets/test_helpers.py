"""C++ index helpers against two independent references: the numpy fallback shipped in
megacore.datasets.helpers (searchsorted over document ends) and a token-by-token walk
written here from the description in docs/ARCHITECTURE.md."""

import numpy as np
import pytest

import megacore_cpp
from megacore.datasets import helpers


def walk_reference(sizes, document_idx, seq_length, num_epochs, tokens_per_epoch,
                   drop_last=True, extra=1):
    """docs/ARCHITECTURE.md ("Sample index"), literally: step through the flat stream
    token by token."""
    total = num_epochs * tokens_per_epoch - extra
    if drop_last:
        num_samples = total // seq_length
    else:
        num_samples = int(np.ceil(np.float32(total) / np.float32(seq_length)))
    # (position in document_idx, offset) of every token of the stream, plus one past it.
    positions = [(p, o) for p, d in enumerate(document_idx) for o in range(sizes[d])]
    rows = [(0, 0)]
    for k in range(1, num_samples + 1):
        end = k * seq_length + extra  # sample k-1 ends here (exclusive)
        if end > len(positions):  # ran out: pin to the last document
            last = len(document_idx) - 1
            rows.append((last, sizes[document_idx[last]] - extra))
            continue
        # the last token of sample k-1 decides the document (end of a document stays in it)
        p, o = positions[end - 1]
        rows.append((p, o + 1 - extra))
    return np.array(rows, dtype=np.int64)


def _random_case(rng, max_docs=25, max_size=40):
    sizes = rng.integers(0, max_size, size=rng.integers(1, max_docs)).astype(np.int32)
    sizes[rng.integers(0, len(sizes))] += 1  # at least one token
    num_epochs = int(rng.integers(1, 4))
    document_idx = np.tile(np.arange(len(sizes), dtype=np.int32), num_epochs)
    rng.shuffle(document_idx)
    return sizes, document_idx, num_epochs, int(sizes.sum(dtype=np.int64))


def test_sample_idx_equals_both_references_on_random_inputs():
    rng = np.random.default_rng(1234)
    checked = 0
    for _ in range(400):
        sizes, document_idx, num_epochs, tokens_per_epoch = _random_case(rng)
        seq_length = int(rng.integers(1, 30))
        extra = int(rng.integers(0, 2))
        drop_last = bool(rng.integers(0, 2))
        if num_epochs * tokens_per_epoch - extra < (seq_length if drop_last else 1):
            continue
        args = (sizes, document_idx, seq_length, num_epochs, tokens_per_epoch, drop_last, extra)
        compiled = megacore_cpp.build_sample_idx_int32(*args)
        compiled64 = megacore_cpp.build_sample_idx_int64(*args)
        fallback = helpers.build_sample_idx_numpy(*args)
        reference = walk_reference(*args)
        assert compiled.dtype == np.int32 and compiled64.dtype == np.int64
        np.testing.assert_array_equal(compiled, reference)
        np.testing.assert_array_equal(compiled64, reference)
        np.testing.assert_array_equal(fallback, reference)
        checked += 1
    assert checked > 300


def test_sample_ending_at_document_end_stays_in_that_document():
    sizes = np.array([4, 3], dtype=np.int32)
    rows = megacore_cpp.build_sample_idx_int32(sizes, np.array([0, 1], dtype=np.int32), 3, 1,
                                               7, True, 1)
    # Sample 0 = tokens 0..3, ending exactly at the end of document 0: row 1 = (0, 4 - 1),
    # not (1, 0). Sample 1 = tokens 3..6 ends at the end of document 1: (1, 3 - 1).
    assert rows.tolist() == [[0, 0], [0, 3], [1, 2]]


def test_more_than_2_31_tokens():
    """Flat positions pass int32 (sum of sizes ~ 1.3e10) while every entry still fits."""
    sizes = np.array([2**31 - 1, 2**31 - 7, 5, 2**31 - 100], dtype=np.int32)
    document_idx = np.array([2, 0, 3, 1, 1, 3, 0, 2], dtype=np.int32)
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    assert 2 * tokens_per_epoch > 2**33
    seq_length = 2**30 + 12345
    for drop_last in (True, False):
        args = (sizes, document_idx, seq_length, 2, tokens_per_epoch, drop_last, 1)
        compiled = helpers.build_sample_idx(*args)
        assert compiled.dtype == np.int32 and len(compiled) > 10
        np.testing.assert_array_equal(compiled, helpers.build_sample_idx_numpy(*args))
        np.testing.assert_array_equal(megacore_cpp.build_sample_idx_int64(*args),
                                      helpers.build_sample_idx_numpy(*args))


def test_wrapper_picks_int64_only_when_needed(monkeypatch):
    sizes = np.array([5, 7], dtype=np.int32)
    small = np.array([0, 1], dtype=np.int32)
    assert not helpers.sample_idx_needs_int64(sizes, small)
    assert helpers.sample_idx_needs_int64(np.array([2**31 - 1], dtype=np.int64) + 1, small)

    class Huge(np.ndarray):
        def __len__(self):
            return 2**31
    assert helpers.sample_idx_needs_int64(sizes, small.view(Huge))
    monkeypatch.setattr(helpers, "sample_idx_needs_int64", lambda *a: True)
    assert helpers.build_sample_idx(sizes, small, 3, 1, 12).dtype == np.int64


def test_fallback_used_without_extension(monkeypatch):
    rng = np.random.default_rng(7)
    sizes, document_idx, num_epochs, tokens = _random_case(rng, max_docs=200, max_size=500)
    compiled = helpers.build_sample_idx(sizes, document_idx, 17, num_epochs, tokens)
    monkeypatch.setattr(helpers, "megacore_cpp", None)
    assert not helpers.compiled_helpers_available()
    np.testing.assert_array_equal(
        helpers.build_sample_idx(sizes, document_idx, 17, num_epochs, tokens), compiled)


def test_sample_idx_errors():
    sizes = np.array([5], dtype=np.int32)
    docs = np.array([0], dtype=np.int32)
    with pytest.raises(ValueError, match="must be positive"):
        megacore_cpp.build_sample_idx_int32(sizes, docs, 0, 1, 5)
    with pytest.raises(ValueError, match="fewer tokens than num_epochs"):
        megacore_cpp.build_sample_idx_int32(sizes, docs, 2, 3, 5)  # claims 15 tokens
    with pytest.raises(IndexError, match="outside sizes"):
        megacore_cpp.build_sample_idx_int32(sizes, np.array([3], dtype=np.int32), 2, 1, 5)
    with pytest.raises(TypeError, match="int32"):
        helpers.build_sample_idx(sizes.astype(np.int64), docs, 2, 1, 5)


# ----------------------------------------------------------------- blending

def _blend(fn, weights, size):
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    fn(dataset_index, sample_index, np.asarray(weights, dtype=np.float64), len(weights), size,
       False)
    return dataset_index, sample_index


def test_blending_equals_numpy_reference():
    rng = np.random.default_rng(5)
    for _ in range(30):
        weights = rng.random(int(rng.integers(1, 6)))
        weights /= weights.sum()
        size = int(rng.integers(1, 3000))
        ours = _blend(megacore_cpp.build_blending_indices, weights, size)
        reference = _blend(helpers.build_blending_indices_numpy, weights, size)
        np.testing.assert_array_equal(ours[0], reference[0])
        np.testing.assert_array_equal(ours[1], reference[1])
        # each sample index counts that dataset's previous picks
        for d in range(len(weights)):
            picked = ours[1][ours[0] == d]
            np.testing.assert_array_equal(picked, np.arange(len(picked)))
        counts = np.bincount(ours[0], minlength=len(weights))
        assert np.all(np.abs(counts - weights * size) <= 1.0 + 1e-9)


def test_blending_ties_go_to_lowest_index():
    dataset_index, _ = _blend(megacore_cpp.build_blending_indices, [0.5, 0.5], 6)
    assert dataset_index.tolist() == [0, 1, 0, 1, 0, 1]


def test_exhaustive_blending_uses_every_sample_once():
    rng = np.random.default_rng(9)
    for _ in range(30):
        sizes = rng.integers(0, 60, size=int(rng.integers(1, 6))).astype(np.int64)
        sizes[0] += 1
        total = int(sizes.sum())
        ours = (np.zeros(total, np.int16), np.zeros(total, np.int64))
        reference = (np.zeros(total, np.int16), np.zeros(total, np.int64))
        megacore_cpp.build_exhaustive_blending_indices(*ours, sizes, len(sizes))
        helpers.build_exhaustive_blending_indices_numpy(*reference, sizes, len(sizes))
        np.testing.assert_array_equal(ours[0], reference[0])
        np.testing.assert_array_equal(ours[1], reference[1])
        assert np.bincount(ours[0], minlength=len(sizes)).tolist() == sizes.tolist()


def test_blending_rejects_outputs_it_would_copy():
    weights = np.array([1.0])
    with pytest.raises(ValueError, match="dataset_index has dtype int32, expected int16"):
        megacore_cpp.build_blending_indices(np.zeros(4, np.int32), np.zeros(4, np.int64),
                                            weights, 1, 4, False)
    with pytest.raises(ValueError, match="at least 8 elements"):
        megacore_cpp.build_blending_indices(np.zeros(4, np.int16), np.zeros(4, np.int64),
                                            weights, 1, 8, False)


def test_equal_to_megatron_core_helpers():
    """Optional cross-check with megatron-core's compiled helpers, when installed."""
    mcore = pytest.importorskip("megatron.core.datasets.helpers_cpp",
                                reason="megatron-core not installed")
    rng = np.random.default_rng(3)
    for _ in range(100):
        sizes, document_idx, num_epochs, tokens_per_epoch = _random_case(rng)
        seq_length, drop_last = int(rng.integers(1, 30)), bool(rng.integers(0, 2))
        if num_epochs * tokens_per_epoch - 1 < seq_length:
            continue
        args = (sizes, document_idx, seq_length, num_epochs, tokens_per_epoch, drop_last, 1)
        np.testing.assert_array_equal(megacore_cpp.build_sample_idx_int32(*args),
                                      mcore.build_sample_idx_int32(*args))
    weights = np.array([0.2, 0.5, 0.3])
    np.testing.assert_array_equal(_blend(megacore_cpp.build_blending_indices, weights, 999)[0],
                                  _blend(mcore.build_blending_indices, weights, 999)[0])
