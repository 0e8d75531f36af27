"""Megatron-compatible indexed datasets: a ``.bin`` of token ids plus an ``.idx`` index.

Why this format: it is what Megatron-LM's ``tools/preprocess_data.py`` writes and what its
GPT datasets read, so corpora move between Megatron and megacore unchanged. The ``.bin``
is memory-mapped, so a dataset of any size opens in constant time and memory.

Vocabulary: a *sequence* is the unit stored (a document, or one sentence when sentences
were split); a *document* is a run of consecutive sequences.

``.idx`` byte layout (little-endian, no padding; ``N`` sequences, ``M`` = documents + 1)::

    offset        size  content
    0             9     magic b"MMIDIDX\\x00\\x00"
    9             8     uint64 version, always 1
    17            1     uint8 dtype code of the .bin elements (see DTYPE_CODES)
    18            8     uint64 N
    26            8     uint64 M
    34            4N    int32  sequence lengths, in tokens
    34+4N         8N    int64  sequence pointers: byte offset of each sequence in .bin
    34+12N        8M    int64  document indices: document d = sequences [doc[d], doc[d+1])
    34+12N+8M     N     int8   sequence modes (multimodal datasets only)

Example: 1000 one-sequence documents give an ``.idx`` of 34 + 12000 + 8008 = 20042 bytes.
The int64 arrays start at offset 34+4N and are generally not 8-byte aligned; numpy views
with an offset handle that.

Every way a file can be wrong (truncated, foreign, other version, inconsistent with its
``.bin``) raises :class:`IndexedDatasetError` naming the file and the problem. Opening
validates the whole index, vectorised: lengths non-negative, every pointer equal to the
byte sum of the lengths before it (so inside the ``.bin``, aligned, no overlap), document
indices from 0 to ``N`` and non-decreasing, and the ``.bin`` size equal to the token count
times the dtype's size (a size that fits another dtype names the dtype code as wrong).
A dtype code changed to another of the same size (uint16 <-> int16, int32 <-> float32)
keeps every size consistent and cannot be seen in the index; reading then rejects
negative ids of a signed dtype and, when ``vocab_size`` is given, ids beyond the
vocabulary. A swap that yields only valid ids (e.g. int16 data of a vocabulary < 32768
read as uint16) is undetectable without a checksum, which the format does not have.
"""

from __future__ import annotations

import array
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Optional, Sequence, Type, Union

import numpy as np

__all__ = [
    "DTYPE_CODES",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "IndexHeader",
    "data_file_path",
    "dtype_code",
    "encode_index",
    "get_bin_path",
    "get_idx_path",
    "index_file_path",
    "optimal_dtype",
    "read_index_header",
]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # magic (9) + version (8) + dtype code (1) + N (8) + M (8)
_HEADER = struct.Struct("<9sQBQQ")

# The numbers fairseq chose; Megatron kept them, so they are part of the file format.
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}

# Megatron's preprocessing picks uint16 below this vocabulary size (not 65536: it keeps a
# margin for ids added after preprocessing).
_UINT16_VOCAB_LIMIT = 65500

DTypeLike = Union[Type[np.number], np.dtype, str]


class IndexedDatasetError(ValueError):
    """An ``.idx``/``.bin`` pair is missing, truncated, foreign or inconsistent."""


def data_file_path(path_prefix: str) -> str:
    """Path of the ``.bin`` for ``path_prefix``."""
    return path_prefix + ".bin"


def index_file_path(path_prefix: str) -> str:
    """Path of the ``.idx`` for ``path_prefix``."""
    return path_prefix + ".idx"


# Megatron's names for the same two functions, so ported code keeps working.
get_bin_path = data_file_path
get_idx_path = index_file_path


def optimal_dtype(vocab_size: Optional[int]) -> Type[np.number]:
    """Smallest dtype Megatron would store ids of a ``vocab_size`` vocabulary in.

    ``uint16`` when the vocabulary is known and smaller than 65500, else ``int32``.
    """
    if vocab_size is not None and vocab_size < _UINT16_VOCAB_LIMIT:
        return np.uint16
    return np.int32


def dtype_code(dtype: DTypeLike) -> int:
    """The ``.idx`` code of ``dtype``; raises ``IndexedDatasetError`` for other dtypes."""
    wanted = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == wanted:
            return code
    raise IndexedDatasetError(f"dtype {wanted} cannot be stored in an indexed dataset")


def encode_index(sequence_lengths: np.ndarray, document_indices: np.ndarray,
                 dtype: DTypeLike, sequence_modes: Optional[np.ndarray] = None) -> bytes:
    """The complete ``.idx`` file content for the given arrays.

    Args:
        sequence_lengths: tokens per sequence (stored as int32).
        document_indices: ``[0, ..., N]`` document bookends (stored as int64).
        dtype: dtype of the ``.bin`` elements; sets the dtype code and the pointer stride.
        sequence_modes: per-sequence int8 modes, for multimodal datasets only.
    """
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    documents = np.asarray(document_indices, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    # Pointers are byte offsets, accumulated in int64: a corpus passes 2 GiB long before
    # any single length gets near int32's limit.
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= itemsize
    parts = [_HEADER.pack(MAGIC, VERSION, dtype_code(dtype), len(lengths), len(documents)),
             lengths.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(),
             documents.astype("<i8").tobytes()]
    if sequence_modes is not None:
        parts.append(np.asarray(sequence_modes, dtype=np.int8).tobytes())
    return b"".join(parts)


@dataclass(frozen=True)
class IndexHeader:
    """The fixed-size start of an ``.idx`` file."""

    dtype: Type[np.number]
    """dtype of the ``.bin`` elements."""
    num_sequences: int
    """``N``: entries of the lengths and pointers arrays."""
    num_document_entries: int
    """``M``: entries of the document-index array (documents + 1)."""
    has_modes: bool
    """True when the file carries the multimodal sequence-modes array."""


def read_index_header(idx_path: str) -> IndexHeader:
    """Read and check the header of ``idx_path`` against the file size.

    Raises:
        IndexedDatasetError: the file is missing, shorter than its header says, not a
            Megatron index, of another version, or has an unknown dtype code.
    """
    try:
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as err:
        raise IndexedDatasetError(f"{idx_path}: cannot read index file ({err})") from err
    if not head.startswith(MAGIC) and not (len(head) < len(MAGIC) and MAGIC.startswith(head)):
        raise IndexedDatasetError(
            f"{idx_path}: not a Megatron indexed-dataset index (magic bytes "
            f"{head[:len(MAGIC)]!r}, expected {MAGIC!r})")
    if len(head) < HEADER_SIZE:
        raise IndexedDatasetError(
            f"{idx_path}: truncated index file ({size} bytes; the header alone needs "
            f"{HEADER_SIZE})")
    _, version, code, num_sequences, num_documents = _HEADER.unpack(head)
    if version != VERSION:
        raise IndexedDatasetError(
            f"{idx_path}: unsupported index version {version} (this reader knows version "
            f"{VERSION})")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} in the header")
    expected = HEADER_SIZE + 12 * num_sequences + 8 * num_documents
    if size == expected + num_sequences and num_sequences > 0:
        has_modes = True
    elif size == expected:
        has_modes = False
    elif size < expected:
        raise IndexedDatasetError(
            f"{idx_path}: truncated index file ({size} bytes, but the header's "
            f"{num_sequences} sequences and {num_documents} document entries need {expected})")
    else:
        raise IndexedDatasetError(
            f"{idx_path}: {size - expected} unexpected trailing bytes after the arrays "
            f"({num_sequences} sequences, {num_documents} document entries)")
    return IndexHeader(DTYPE_CODES[code], num_sequences, num_documents, has_modes)


class IndexedDataset:
    """Read-only view of a ``.bin``/``.idx`` pair; ``ds[i]`` is sequence ``i``.

    Args:
        path_prefix: path without the ``.bin``/``.idx`` suffix.
        mmap: memory-map the ``.bin`` (default). ``False`` reads it into memory, which
            is only sensible for small datasets.

    Raises:
        IndexedDatasetError: see :func:`read_index_header`; also when the document
            indices or the ``.bin`` size disagree with the sequence table.
    """

    def __init__(self, path_prefix: str, mmap: bool = True,
                 vocab_size: Optional[int] = None) -> None:
        self.path_prefix = path_prefix
        self.mmap = mmap
        self.vocab_size = vocab_size
        self._open()

    def _open(self) -> None:
        idx_path = index_file_path(self.path_prefix)
        header = read_index_header(idx_path)
        self.dtype = header.dtype
        raw = _map_file(idx_path, mmap=True)
        n, m = header.num_sequences, header.num_document_entries
        self.sequence_lengths = np.frombuffer(raw, np.int32, n, HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(raw, np.int64, n, HEADER_SIZE + 4 * n)
        self.document_indices = np.frombuffer(raw, np.int64, m, HEADER_SIZE + 12 * n)
        self.sequence_modes = (np.frombuffer(raw, np.int8, n, HEADER_SIZE + 12 * n + 8 * m)
                               if header.has_modes else None)
        self._check_document_indices(idx_path)
        _check_lengths(idx_path, self.sequence_lengths)
        # The size first: a wrong dtype code shows there as a size that fits another dtype.
        self._check_bin_size(int(self.sequence_lengths.sum(dtype=np.int64)))
        _check_pointers(idx_path, self.sequence_lengths, self.sequence_pointers, self.dtype)
        self._bin = _map_file(data_file_path(self.path_prefix), mmap=self.mmap)

    def _check_document_indices(self, idx_path: str) -> None:
        docs, n = self.document_indices, len(self.sequence_lengths)
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != n:
            first = int(docs[0]) if len(docs) else None
            last = int(docs[-1]) if len(docs) else None
            raise IndexedDatasetError(
                f"{idx_path}: document indices must run from 0 to the sequence count {n}, "
                f"found first={first} last={last}")
        for start, block in _blocks(docs):
            bad = np.flatnonzero(np.diff(block) < 0)
            if len(bad):
                d = start + int(bad[0]) + 1
                raise IndexedDatasetError(
                    f"{idx_path}: document indices must not decrease: entry {d} is "
                    f"{int(docs[d])} after {int(docs[d - 1])} (first bad entry)")

    def _check_bin_size(self, total_tokens: int) -> None:
        bin_path = data_file_path(self.path_prefix)
        itemsize = np.dtype(self.dtype).itemsize
        expected = total_tokens * itemsize
        try:
            size = os.path.getsize(bin_path)
        except OSError as err:
            raise IndexedDatasetError(f"{bin_path}: cannot read data file ({err})") from err
        if size != expected:
            hint = ""
            other = [np.dtype(t).name for t in DTYPE_CODES.values()
                     if total_tokens and np.dtype(t).itemsize * total_tokens == size]
            if other:
                hint = (f"; its size fits {total_tokens} tokens of {'/'.join(sorted(set(other)))}"
                        f": the index's dtype code ({np.dtype(self.dtype).name}) is wrong")
            raise IndexedDatasetError(
                f"{bin_path}: data file has {size} bytes but its index "
                f"{index_file_path(self.path_prefix)} describes {total_tokens} tokens of "
                f"{itemsize} bytes = {expected} (mismatched or truncated pair){hint}")

    def __getstate__(self):
        # Re-open in the receiving process instead of pickling the mapped bytes.
        return {"path_prefix": self.path_prefix, "mmap": self.mmap,
                "vocab_size": self.vocab_size}

    def __setstate__(self, state) -> None:
        self.path_prefix, self.mmap = state["path_prefix"], state["mmap"]
        self.vocab_size = state.get("vocab_size")
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: Union[int, np.integer, slice]):
        """Sequence ``idx`` as a numpy array; a step-1 slice gives a list of arrays."""
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("IndexedDataset slices must have step 1")
            return [self.get(i) for i in range(start, stop)]
        return self.get(int(idx))

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end by default)."""
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sequence {idx} out of range for {self.path_prefix} ({n} sequences)")
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence {idx} "
                             f"of length {size}")
        itemsize = np.dtype(self.dtype).itemsize
        start = int(self.sequence_pointers[idx]) + offset * itemsize
        tokens = np.frombuffer(self._bin, self.dtype, length, start)
        self._check_ids(tokens, idx, offset)
        return tokens

    def _check_ids(self, tokens: np.ndarray, idx: int, offset: int) -> None:
        """Ids a corrupt file gives away on reading: negative ids (a signed dtype code
        where the writer used unsigned, e.g. uint16 read as int16) and, when
        ``vocab_size`` is known, ids beyond the vocabulary."""
        if not len(tokens):
            return
        signed = np.issubdtype(self.dtype, np.signedinteger)
        low = int(tokens.min()) if signed else 0
        high = int(tokens.max()) if self.vocab_size is not None else 0
        if low >= 0 and (self.vocab_size is None or high < self.vocab_size):
            return
        pos = int(np.argmax(tokens < 0)) if low < 0 else int(np.argmax(tokens >= self.vocab_size))
        raise IndexedDatasetError(
            f"{data_file_path(self.path_prefix)}: sequence {idx} token {offset + pos} is "
            f"{int(tokens[pos])}, outside [0, {self.vocab_size or 'max'}) (dtype "
            f"{np.dtype(self.dtype).name}): a corrupt .bin or a wrong dtype code in "
            f"{index_file_path(self.path_prefix)}")

    @property
    def num_documents(self) -> int:
        """Number of documents (``M - 1``)."""
        return len(self.document_indices) - 1

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """True when both files of ``path_prefix`` exist."""
        return (os.path.isfile(index_file_path(path_prefix))
                and os.path.isfile(data_file_path(path_prefix)))


_BLOCK = 1 << 22  # entries per vectorised pass: bounds the temporaries to ~32 MB


def _blocks(array: np.ndarray):
    """``(start, array[start:start + _BLOCK + 1])``: overlapping by one entry so that a
    difference across a block boundary is seen."""
    for start in range(0, max(len(array) - 1, 1), _BLOCK):
        yield start, np.asarray(array[start:start + _BLOCK + 1])


def _check_lengths(idx_path: str, lengths: np.ndarray) -> None:
    """Every sequence length is >= 0 (vectorised in blocks)."""
    for start in range(0, len(lengths), _BLOCK):
        negative = np.flatnonzero(np.asarray(lengths[start:start + _BLOCK]) < 0)
        if len(negative):
            i = start + int(negative[0])
            raise IndexedDatasetError(f"{idx_path}: sequence {i} has negative length "
                                      f"{int(lengths[i])} (first bad entry)")


def _check_pointers(idx_path: str, lengths: np.ndarray, pointers: np.ndarray, dtype) -> None:
    """Every pointer is the running byte sum of the lengths before it (what Megatron's
    builder writes, so each sequence lies inside the ``.bin``, aligned, without overlap).
    Vectorised in blocks."""
    itemsize = np.dtype(dtype).itemsize
    offset = 0  # bytes before the block
    for start in range(0, len(lengths), _BLOCK):
        nbytes = np.asarray(lengths[start:start + _BLOCK], dtype=np.int64) * itemsize
        ends = np.cumsum(nbytes) + offset
        expected = ends - nbytes
        bad = np.flatnonzero(np.asarray(pointers[start:start + _BLOCK]) != expected)
        if len(bad):
            i = start + int(bad[0])
            raise IndexedDatasetError(
                f"{idx_path}: sequence {i} has pointer {int(pointers[i])}, expected "
                f"{int(expected[bad[0]])} (the byte sum of the lengths before it times "
                f"itemsize {itemsize}; first bad entry)")
        offset = int(ends[-1])


def _map_file(path: str, mmap: bool):
    """The bytes of ``path``, memory-mapped unless ``mmap`` is False; empty files allowed."""
    if os.path.getsize(path) == 0:
        return b""  # mmap refuses empty files
    if mmap:
        return np.memmap(path, dtype=np.uint8, mode="r")
    with open(path, "rb") as f:
        return f.read()


class IndexedDatasetBuilder:
    """Writes a ``.bin``/``.idx`` pair; nothing appears under the final names until
    :meth:`finalize`, so a failed or interrupted run never leaves a half-written dataset.

    Example::

        builder = IndexedDatasetBuilder("out/corpus_text_document.bin", dtype=np.uint16)
        builder.add_document([5, 6, 7, 0], lengths=[4])
        builder.finalize("out/corpus_text_document.idx")

    Args:
        bin_path: final path of the ``.bin``; data goes to a temporary file beside it.
        dtype: element dtype of the ``.bin`` (Megatron's default is int32).
    """

    def __init__(self, bin_path: str, dtype: DTypeLike = np.int32) -> None:
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype).type
        dtype_code(self.dtype)  # reject dtypes the format cannot name, before writing
        self._tmp_bin_path = _temporary_path(bin_path)
        self._data_file = open(self._tmp_bin_path, "wb")
        self._lengths = array.array("i")
        self._document_indices = array.array("q", [0])

    @property
    def num_sequences(self) -> int:
        """Sequences written so far."""
        return len(self._lengths)

    def add_item(self, tokens: Sequence[int]) -> None:
        """Append one sequence (call :meth:`end_document` to close its document)."""
        data = np.asarray(tokens, dtype=self.dtype)
        self._data_file.write(data.tobytes())
        self._lengths.append(data.size)

    def end_document(self) -> None:
        """Close the current document (a repeated index when it holds no sequence)."""
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens: Sequence[int], lengths: Sequence[int]) -> None:
        """Append one document: all its ids at once, split into sequences by ``lengths``."""
        data = np.asarray(tokens, dtype=self.dtype)
        self._data_file.write(data.tobytes())
        self._extend_lengths(np.asarray(lengths, dtype=np.int32))
        self._document_indices.append(len(self._lengths))

    def add_documents(self, tokens: np.ndarray, sequence_lengths: np.ndarray,
                      sequences_per_document: np.ndarray) -> None:
        """Append many documents with one write (the preprocessing fast path).

        Args:
            tokens: ids of all the documents, concatenated.
            sequence_lengths: tokens per sequence; sums to ``len(tokens)``.
            sequences_per_document: sequences per document, in order; 0 = empty document.
        """
        data = np.asarray(tokens, dtype=self.dtype)
        self._data_file.write(data.tobytes())
        start = len(self._lengths)
        self._extend_lengths(np.asarray(sequence_lengths, dtype=np.int32))
        ends = start + np.cumsum(np.asarray(sequences_per_document, dtype=np.int64))
        self._document_indices.frombytes(ends.astype(np.int64).tobytes())

    def add_index(self, path_prefix: str) -> None:
        """Append every document of the dataset at ``path_prefix`` (same dtype required)."""
        other = IndexedDataset(path_prefix)
        if np.dtype(other.dtype) != np.dtype(self.dtype):
            raise IndexedDatasetError(
                f"{index_file_path(path_prefix)}: dtype {np.dtype(other.dtype)} differs from "
                f"the dataset being built ({np.dtype(self.dtype)})")
        if other.sequence_modes is not None:
            raise IndexedDatasetError(
                f"{index_file_path(path_prefix)}: multimodal datasets (sequence modes) can be "
                f"read but not merged")
        offset = len(self._lengths)
        self._extend_lengths(np.asarray(other.sequence_lengths, dtype=np.int32))
        shifted = np.asarray(other.document_indices[1:], dtype=np.int64) + offset
        self._document_indices.frombytes(shifted.tobytes())
        with open(data_file_path(path_prefix), "rb") as f:
            shutil.copyfileobj(f, self._data_file, length=16 << 20)

    def finalize(self, idx_path: str) -> None:
        """Write the ``.idx`` and move both files to their final names."""
        self._data_file.close()
        tmp_idx_path = _temporary_path(idx_path)
        try:
            content = encode_index(np.frombuffer(self._lengths, np.int32),
                                   np.frombuffer(self._document_indices, np.int64),
                                   self.dtype)
            with open(tmp_idx_path, "wb") as f:
                f.write(content)
            # .bin first: a reader needs the .idx, so the pair is never half-visible
            # through a new .idx pointing at an old .bin.
            os.replace(self._tmp_bin_path, self.bin_path)
            os.replace(tmp_idx_path, idx_path)
        except BaseException:
            _remove_quietly(tmp_idx_path)
            self.discard()
            raise

    def discard(self) -> None:
        """Abandon the dataset: close and delete the temporary ``.bin``."""
        if not self._data_file.closed:
            self._data_file.close()
        _remove_quietly(self._tmp_bin_path)

    def _extend_lengths(self, lengths: np.ndarray) -> None:
        self._lengths.frombytes(lengths.astype(np.int32).tobytes())


def _temporary_path(final_path: str) -> str:
    return f"{final_path}.tmp-{os.getpid()}"


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass

