"""Read Megatron indexed datasets (a `.bin` of token ids and its `.idx`) without megatron-core.

The `.idx` layout, as written by `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version, always 1
    uint8     dtype code of the .bin (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
              7 float32, 8 uint16)
    uint64    sequence_count
    uint64    document_count (the length of document_indices, i.e. documents + 1)
    int32     sequence_lengths[sequence_count]      tokens per sequence
    int64     sequence_pointers[sequence_count]     byte offset of each sequence in the .bin
    int64     document_indices[document_count]      sequence index where each document starts,
                                                    0 first and sequence_count last
    (int8     sequence_modes[sequence_count]        only in multimodal files; not read here)

Everything is little-endian. Both files are memory-mapped, so opening a dataset costs only the
index arrays' page-ins, and reading a window touches only the pages it needs.
"""

import os
import shutil
import struct

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8

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


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def strip_suffix(path: str) -> str:
    """Accept `data/books`, `data/books.bin` or `data/books.idx` for the same prefix."""
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


class IndexedTokens:
    """One `.bin/.idx` pair, memory-mapped.

    `tokens` is the whole `.bin` as one flat array: the builder writes documents back to back, so
    the concatenation of all documents (each ending with its EOD when written by data_tools or by
    Megatron's preprocess_data.py --append-eod) is exactly the file's content.
    """

    def __init__(self, prefix: str):
        prefix = strip_suffix(prefix)
        self.prefix = prefix
        for path in (idx_path(prefix), bin_path(prefix)):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} does not exist: an indexed dataset needs both {prefix}.bin and "
                    f"{prefix}.idx (make them with `python -m data_tools preprocess`)"
                )
        if os.path.getsize(idx_path(prefix)) == 0:  # np.memmap would say only "cannot mmap an empty file"
            raise ValueError(
                f"{idx_path(prefix)} is empty (0 bytes): a write was interrupted; rebuild it with "
                f"`python -m data_tools preprocess`"
            )
        index = np.memmap(idx_path(prefix), dtype=np.uint8, mode="r")
        if index.size < _HEADER_BYTES or bytes(index[:9]) != INDEX_MAGIC:
            raise ValueError(f"{idx_path(prefix)} is not a Megatron index file (bad magic bytes)")
        (version,) = index[9:17].view("<u8")
        if version != INDEX_VERSION:
            raise ValueError(f"{idx_path(prefix)} has index version {version}; only 1 is known")
        code = int(index[17])
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path(prefix)} has unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        sequence_count, document_count = (int(x) for x in index[18:34].view("<u8"))

        offset = _HEADER_BYTES
        self.sequence_lengths = _array(index, offset, "<i4", sequence_count)
        offset += 4 * sequence_count
        self.sequence_pointers = _array(index, offset, "<i8", sequence_count)
        offset += 8 * sequence_count
        self.document_indices = _array(index, offset, "<i8", document_count)

        if document_count < 1 or self.document_indices[-1] != sequence_count:
            raise ValueError(
                f"{idx_path(prefix)} is inconsistent: its last document index is not the sequence "
                f"count {sequence_count}; the file is truncated or corrupt, rebuild it"
            )
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_bytes = os.path.getsize(bin_path(prefix))
        if bin_bytes != self.num_tokens * self.dtype.itemsize:
            raise ValueError(
                f"{bin_path(prefix)} has {bin_bytes} bytes but its index describes "
                f"{self.num_tokens} tokens of {self.dtype.name}; the pair does not belong together "
                f"or a write was interrupted, rebuild it"
            )
        # np.memmap refuses zero-length files, and an empty dataset is still a valid dataset.
        if self.num_tokens:
            self.tokens = np.memmap(bin_path(prefix), dtype=self.dtype, mode="r")
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (a document may hold several sequences in sentence-split files)."""
        ends = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return np.diff(ends[self.document_indices])

    def document(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} is out of range: {self.prefix} has {self.num_documents}")
        first, last = self.document_indices[i], self.document_indices[i + 1]
        if first == last:
            return self.tokens[:0]
        start = self.sequence_pointers[first] // self.dtype.itemsize
        stop = start + int(self.sequence_lengths[first:last].sum(dtype=np.int64))
        return self.tokens[start:stop]


def _array(buffer: np.ndarray, offset: int, dtype: str, count: int) -> np.ndarray:
    nbytes = np.dtype(dtype).itemsize * count
    if offset + nbytes > buffer.size:
        raise ValueError("index file is truncated: it ends before its arrays do; rebuild it")
    return buffer[offset : offset + nbytes].view(dtype)


class IndexedWriter:
    """Writes one `.bin/.idx` pair byte for byte as megatron-core's IndexedDatasetBuilder does.

    The same calls as that builder (`add_document`, `add_index`, `finalize`), plus `add_documents`
    for many documents at once, without importing megatron-core: its import alone takes seconds,
    longer than preprocessing a small corpus. tests/test_indexed_writer.py holds the bytes against
    megatron-core's builder.
    """

    def __init__(self, bin_file: str, dtype=np.int32):
        codes = {np.dtype(value): code for code, value in DTYPE_CODES.items()}
        self.dtype = np.dtype(dtype)
        if self.dtype not in codes:
            raise ValueError(f"dtype {self.dtype.name} has no Megatron dtype code")
        self.dtype_code = codes[self.dtype]
        self.data_file = open(bin_file, "wb")
        self.sequence_lengths: list[np.ndarray] = []  # chunks of int32, concatenated at the end
        self.document_ends: list[np.ndarray] = []  # chunks of int64: sequence count after each document
        self.sequence_count = 0

    def add_document(self, tokens, lengths: list[int]) -> None:
        """One document of one or more sequences (`lengths` tokens each) stored back to back."""
        self.data_file.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self.sequence_lengths.append(np.asarray(lengths, dtype=np.int32))
        self.sequence_count += len(lengths)
        self.document_ends.append(np.array([self.sequence_count], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Many one-sequence documents stored back to back in `tokens` (`lengths` tokens each)."""
        lengths = np.asarray(lengths, dtype=np.int32)
        self.data_file.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self.sequence_lengths.append(lengths)
        ends = self.sequence_count + np.arange(1, len(lengths) + 1, dtype=np.int64)
        self.document_ends.append(ends)
        self.sequence_count += len(lengths)

    def add_index(self, prefix: str) -> None:
        """Append a whole pair (its documents after ours), as megatron's add_index does."""
        other = IndexedTokens(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{prefix} holds {other.dtype.name} tokens, this pair {self.dtype.name}")
        self.sequence_lengths.append(np.array(other.sequence_lengths, dtype=np.int32))
        self.document_ends.append(self.sequence_count + np.array(other.document_indices[1:], dtype=np.int64))
        self.sequence_count += other.num_sequences
        del other  # release the memory maps before copying the file
        with open(bin_path(prefix), "rb") as source:
            shutil.copyfileobj(source, self.data_file)

    def finalize(self, idx_file: str) -> None:
        self.data_file.close()
        lengths = np.concatenate([np.zeros(0, np.int32), *self.sequence_lengths])
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        document_indices = np.concatenate([np.zeros(1, np.int64), *self.document_ends])
        with open(idx_file, "wb") as index:
            index.write(INDEX_MAGIC)
            index.write(struct.pack("<Q", INDEX_VERSION))
            index.write(struct.pack("<B", self.dtype_code))
            index.write(struct.pack("<Q", len(lengths)))
            index.write(struct.pack("<Q", len(document_indices)))
            index.write(lengths.astype("<i4").tobytes(order="C"))
            index.write(pointers.astype("<i8").tobytes(order="C"))
            index.write(document_indices.astype("<i8").tobytes(order="C"))
