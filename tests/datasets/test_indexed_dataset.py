"""The .bin/.idx format: exact bytes, round trips, merging, and every broken-file error."""

import os
import struct

import numpy as np
import pytest

from megacore.datasets.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    encode_index,
    optimal_dtype,
    read_index_header,
)


def _write(prefix, documents, dtype=np.uint16):
    """documents: list of documents, each a list of sequences (lists of ids)."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for document in documents:
        for sequence in document:
            builder.add_item(sequence)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def test_idx_bytes_match_the_hand_computed_layout(tmp_path):
    # Two documents: [[5, 6, 7]] and [[8], [9, 10]] -> 3 sequences, 3 document entries.
    prefix = _write(str(tmp_path / "d"), [[[5, 6, 7]], [[8], [9, 10]]], dtype=np.uint16)
    expected = (b"MMIDIDX\x00\x00"                      # magic
                + (1).to_bytes(8, "little")             # version
                + bytes([8])                            # dtype code 8 = uint16
                + (3).to_bytes(8, "little")             # N sequences
                + (3).to_bytes(8, "little")             # M document entries
                + b"".join(n.to_bytes(4, "little") for n in (3, 1, 2))     # lengths
                + b"".join(n.to_bytes(8, "little") for n in (0, 6, 8))     # byte pointers
                + b"".join(n.to_bytes(8, "little") for n in (0, 1, 3)))    # doc indices
    with open(prefix + ".idx", "rb") as f:
        assert f.read() == expected
    assert len(expected) == 34 + 12 * 3 + 8 * 3
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == np.array([5, 6, 7, 8, 9, 10], dtype="<u2").tobytes()


def test_idx_size_for_1000_single_sequence_documents(tmp_path):
    prefix = _write(str(tmp_path / "d"), [[[i % 7 + 1]] for i in range(1000)], dtype=np.int32)
    assert os.path.getsize(prefix + ".idx") == 20042  # 34 + 12000 + 8008 (docs/ARCHITECTURE.md)


@pytest.mark.parametrize("dtype,code", [(np.uint8, 1), (np.int8, 2), (np.int16, 3),
                                        (np.int32, 4), (np.int64, 5), (np.float64, 6),
                                        (np.float32, 7), (np.uint16, 8)])
def test_dtype_codes_and_round_trip(tmp_path, dtype, code):
    rng = np.random.default_rng(code)
    documents = [[list(rng.integers(0, 100, size=rng.integers(1, 20))) for _ in range(
        rng.integers(1, 4))] for _ in range(30)]
    prefix = _write(str(tmp_path / "d"), documents, dtype=dtype)
    with open(prefix + ".idx", "rb") as f:
        assert f.read()[17] == code
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype
    flat = [s for d in documents for s in d]
    assert len(ds) == len(flat)
    for i, sequence in enumerate(flat):
        np.testing.assert_array_equal(ds[i], np.array(sequence, dtype=dtype))
    assert ds.document_indices.tolist() == [0] + list(np.cumsum([len(d) for d in documents]))
    np.testing.assert_array_equal(ds.get(2, offset=1, length=0), np.zeros(0, dtype))
    assert [a.tolist() for a in ds[1:3]] == [np.array(s, dtype).tolist() for s in flat[1:3]]


def test_get_sub_range_and_negative_index(tmp_path):
    prefix = _write(str(tmp_path / "d"), [[[1, 2, 3, 4, 5]], [[6, 7]]])
    ds = IndexedDataset(prefix)
    assert ds.get(0, offset=1, length=3).tolist() == [2, 3, 4]
    assert ds.get(0, offset=3).tolist() == [4, 5]
    assert ds[-1].tolist() == [6, 7]
    with pytest.raises(IndexError, match="outside sequence 0 of length 5"):
        ds.get(0, offset=4, length=2)
    with pytest.raises(IndexError, match="out of range"):
        ds[2]


def test_add_document_empty_documents_and_pickling(tmp_path):
    import pickle

    prefix = str(tmp_path / "d")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    builder.add_document([1, 2, 3, 4], lengths=[1, 3])
    builder.add_document([], lengths=[])  # an empty document: repeated index
    builder.add_documents(np.array([5, 6, 7]), np.array([2, 1]), np.array([1, 0, 1]))
    builder.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert ds.document_indices.tolist() == [0, 2, 2, 3, 3, 4]
    assert ds.sequence_lengths.tolist() == [1, 3, 2, 1]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[3].tolist() == [7] and len(pickle.dumps(ds)) < 500  # re-opened, not copied


def test_add_index_merges_and_rejects_other_dtypes(tmp_path):
    a = _write(str(tmp_path / "a"), [[[1, 2]], [[3]]])
    b = _write(str(tmp_path / "b"), [[[4], [5, 6]]])
    merged = str(tmp_path / "m")
    builder = IndexedDatasetBuilder(merged + ".bin", dtype=np.uint16)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(merged + ".idx")
    both = _write(str(tmp_path / "both"), [[[1, 2]], [[3]], [[4], [5, 6]]])
    for ext in (".bin", ".idx"):
        with open(merged + ext, "rb") as f, open(both + ext, "rb") as g:
            assert f.read() == g.read()
    c = _write(str(tmp_path / "c"), [[[1]]], dtype=np.int32)
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    with pytest.raises(IndexedDatasetError, match=r"c\.idx: dtype int32 differs .*uint16"):
        builder.add_index(c)
    builder.discard()
    assert os.listdir(tmp_path / "") and not any(n.startswith("x.bin") for n in
                                                 os.listdir(tmp_path))


def test_nothing_visible_before_finalize(tmp_path):
    prefix = str(tmp_path / "d")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_item([1, 2, 3])
    builder.end_document()
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    builder.discard()
    assert os.listdir(tmp_path) == []


def test_optimal_dtype():
    assert optimal_dtype(50257) is np.uint16
    assert optimal_dtype(65499) is np.uint16
    assert optimal_dtype(65500) is np.int32
    assert optimal_dtype(None) is np.int32


def test_encode_index_with_modes_is_read_back(tmp_path):
    prefix = str(tmp_path / "mm")
    with open(prefix + ".idx", "wb") as f:
        f.write(encode_index(np.array([2, 1]), np.array([0, 2]), np.uint8,
                             sequence_modes=np.array([0, 1])))
    with open(prefix + ".bin", "wb") as f:
        f.write(bytes([1, 2, 3]))
    ds = IndexedDataset(prefix)
    assert ds.sequence_modes.tolist() == [0, 1] and ds[1].tolist() == [3]


# ----------------------------------------------------------------- broken files

@pytest.fixture
def good(tmp_path):
    return _write(str(tmp_path / "good"), [[[1, 2, 3]], [[4, 5]]])


def _corrupt(prefix, content):
    with open(prefix + ".idx", "wb") as f:
        f.write(content)


def _idx_bytes(prefix):
    with open(prefix + ".idx", "rb") as f:
        return f.read()


@pytest.mark.parametrize("cut", [0, 5, 20, 33, 40, 80])
def test_truncated_idx(good, cut):
    _corrupt(good, _idx_bytes(good)[:cut])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx: truncated index file"):
        IndexedDataset(good)


def test_foreign_file(good):
    _corrupt(good, b'{"not": "an index"}' + bytes(40))
    with pytest.raises(IndexedDatasetError, match=r"good\.idx: not a Megatron indexed-dataset"):
        IndexedDataset(good)


def test_wrong_version(good):
    data = bytearray(_idx_bytes(good))
    data[9:17] = struct.pack("<Q", 2)
    _corrupt(good, bytes(data))
    with pytest.raises(IndexedDatasetError, match=r"unsupported index version 2"):
        IndexedDataset(good)


def test_unknown_dtype_code(good):
    data = bytearray(_idx_bytes(good))
    data[17] = 9
    _corrupt(good, bytes(data))
    with pytest.raises(IndexedDatasetError, match=r"unknown dtype code 9"):
        read_index_header(good + ".idx")


def test_trailing_bytes(good):
    _corrupt(good, _idx_bytes(good) + bytes(5))
    with pytest.raises(IndexedDatasetError, match=r"5 unexpected trailing bytes"):
        IndexedDataset(good)


def test_bad_document_indices(good):
    data = bytearray(_idx_bytes(good))
    data[-8:] = struct.pack("<q", 7)  # last document index must equal N = 2
    _corrupt(good, bytes(data))
    with pytest.raises(IndexedDatasetError, match=r"document indices must run from 0 to .* 2"):
        IndexedDataset(good)


def test_truncated_bin_and_missing_files(good):
    with open(good + ".bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(IndexedDatasetError, match=r"good\.bin: data file has 4 bytes but .*10"):
        IndexedDataset(good)
    os.remove(good + ".bin")
    with pytest.raises(IndexedDatasetError, match=r"good\.bin: cannot read data file"):
        IndexedDataset(good)
    with pytest.raises(IndexedDatasetError, match=r"missing\.idx: cannot read index file"):
        IndexedDataset(os.path.join(os.path.dirname(good), "missing"))


# ----------------------------------------------------------------- Megatron itself

def test_bytes_equal_megatron_core_builder(tmp_path):
    """Optional cross-check with megatron-core's own writer and reader, when installed."""
    pytest.importorskip("megatron.core.datasets.indexed_dataset",
                        reason="megatron-core not installed")
    import torch
    from megatron.core.datasets import indexed_dataset as mcore

    rng = np.random.default_rng(0)
    documents = [[list(rng.integers(0, 50000, size=rng.integers(1, 40)))
                  for _ in range(rng.integers(1, 3))] for _ in range(50)]
    ours = _write(str(tmp_path / "ours"), documents, dtype=np.uint16)
    theirs = str(tmp_path / "theirs")
    builder = mcore.IndexedDatasetBuilder(theirs + ".bin", dtype=np.uint16)
    for document in documents:
        for sequence in document:
            builder.add_item(torch.tensor(sequence))
        builder.end_document()
    builder.finalize(theirs + ".idx")
    for ext in (".bin", ".idx"):
        with open(ours + ext, "rb") as f, open(theirs + ext, "rb") as g:
            assert f.read() == g.read(), ext
    reader = mcore.IndexedDataset(ours)
    assert reader[3].tolist() == IndexedDataset(ours)[3].tolist()
