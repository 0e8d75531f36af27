"""Corrupt .idx/.bin pairs: opening (or reading) raises IndexedDatasetError naming the
file and the first bad entry, never a bare numpy error or silently wrong tokens."""

import struct

import numpy as np
import pytest

from megacore.datasets.indexed_dataset import (
    HEADER_SIZE,
    IndexedDataset,
    IndexedDatasetError,
)
from tests.datasets.test_indexed_dataset import _write

# 4 documents, 5 sequences; id 40000 only fits uint16 (it reads as -25536 in int16).
DOCS = [[[1, 2, 3]], [[4], [5, 6]], [[40000, 7]], [[8, 9, 10, 11]]]
N, M = 5, 5


def _patch(path, offset, fmt, value):
    data = bytearray(open(path, "rb").read())
    struct.pack_into(fmt, data, offset, value)
    open(path, "wb").write(bytes(data))


@pytest.fixture()
def prefix(tmp_path):
    return _write(str(tmp_path / "d"), DOCS, dtype=np.uint16)


def _open_error(prefix):
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    return str(e.value)


def test_intact_pair_opens_and_reads(prefix):
    ds = IndexedDataset(prefix, vocab_size=50000)
    assert [list(ds[i]) for i in range(N)] == [s for d in DOCS for s in d]


def test_pointer_off_by_one_byte(prefix):
    _patch(prefix + ".idx", HEADER_SIZE + 4 * N + 8 * 3, "<q", 16 + 1)  # sequence 3: 12 -> 17
    message = _open_error(prefix)
    assert message.startswith(prefix + ".idx: sequence 3 has pointer 17, expected 12")


def test_negative_length(prefix):
    _patch(prefix + ".idx", HEADER_SIZE + 4 * 2, "<i", -2)
    assert _open_error(prefix).startswith(prefix + ".idx: sequence 2 has negative length -2")


def test_length_inconsistent_with_pointers(prefix):
    _patch(prefix + ".idx", HEADER_SIZE + 4 * 1, "<i", 3)  # sequence 1: 1 token -> 3
    _patch(prefix + ".idx", HEADER_SIZE + 4 * 2, "<i", 0)  # sequence 2: 2 -> 0 (same total)
    assert _open_error(prefix).startswith(prefix + ".idx: sequence 2 has pointer 8, expected 12")


def test_document_indices_not_monotonic(prefix):
    _patch(prefix + ".idx", HEADER_SIZE + 12 * N + 8 * 2, "<q", 0)  # [0, 1, 3, 4, 5] -> [0, 1, 0, ...]
    message = _open_error(prefix)
    assert message.startswith(prefix + ".idx: document indices must not decrease: entry 2 is 0 "
                              "after 1")


def test_dtype_code_of_another_size_is_named(prefix):
    _patch(prefix + ".idx", 17, "<B", 4)  # uint16 -> int32
    message = _open_error(prefix)
    assert message.startswith(prefix + ".bin: data file has 24 bytes")
    assert "its size fits 12 tokens of int16/uint16: the index's dtype code (int32) is wrong" \
        in message


def test_dtype_code_of_the_same_size_is_caught_on_reading(prefix):
    """uint16 -> int16 keeps every size consistent: opening cannot see it; the negative
    id it produces is refused when read."""
    _patch(prefix + ".idx", 17, "<B", 3)
    ds = IndexedDataset(prefix)
    assert list(ds[0]) == [1, 2, 3]
    with pytest.raises(IndexedDatasetError, match=r"\.bin: sequence 3 token 0 is -25536") as e:
        ds[3]
    assert prefix + ".idx" in str(e.value)


def test_ids_beyond_a_known_vocabulary(prefix):
    ds = IndexedDataset(prefix, vocab_size=1000)
    with pytest.raises(IndexedDatasetError, match=r"sequence 3 token 0 is 40000, outside \[0, 1000\)"):
        ds.get(3)
    assert list(ds.get(3, offset=1)) == [7]


def test_truncated_bin(prefix):
    data = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:-2])
    assert _open_error(prefix).startswith(prefix + ".bin: data file has 22 bytes")
