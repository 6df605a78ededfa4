"""Megatron "MMIDIDX" binidx files, byte-compatible with RWKV-LM.

`PREFIX.bin` is the raw concatenation of all items' tokens (no header). `PREFIX.idx` is, little-endian:
magic `MMIDIDX\\0\\0`, version (u64 = 1), dtype code (u8), item count (u64), doc_idx count (u64), then the item sizes
(int32), the item byte offsets into `.bin` (int64) and doc_idx (int64: the first item of each document, plus the
item count at the end). RWKV-LM writes one item per document, so its doc_idx is 0, 1, ..., n.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from rwkvkit.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, len(sizes), len(doc_idx)

DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,  # Megatron maps python `float` here; kept only to read such files
    7: np.float64,
    8: np.uint16,
}
_CODE_OF = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
            np.dtype(np.int64): 5, np.dtype(np.float64): 7, np.dtype(np.uint16): 8}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 (code 8, what RWKV-LM uses) when every id fits, else int32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def dtype_code(dtype) -> int:
    return _CODE_OF[np.dtype(dtype)]


def write_index(path: str | Path, dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    """Write a complete `.idx` for items of `sizes` tokens laid out back to back in `.bin`."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, dtype_code(dtype), len(sizes), len(doc_idx)))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())


class BinIdxWriter:
    """Streams items into `bin_path`; `finish(idx_path)` writes the index. Memory grows with the item count only.

    The caller picks the file names (prepare writes under temporary names and renames at the very end).
    """

    def __init__(self, bin_path: str | Path, dtype):
        self.dtype = np.dtype(dtype)
        self._file = open(bin_path, "wb", buffering=1 << 20)
        self._sizes = _GrowableArray(np.int32)
        self._doc_idx = _GrowableArray(np.int64)
        self._doc_idx.append(0)
        self.n_tokens = 0
        self._doc_start_tokens = 0

    def add_item(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        if arr.size > np.iinfo(np.int32).max:
            raise DataError(f"an item of {arr.size} tokens does not fit the int32 sizes of a .idx file")
        self._file.write(arr.tobytes())
        self._sizes.append(arr.size)
        self.n_tokens += arr.size

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))
        self._doc_start_tokens = self.n_tokens

    def discard_document(self) -> None:
        """Drop the items added since the last `end_document` (a document found bad halfway through)."""
        self._file.seek(self._doc_start_tokens * self.dtype.itemsize)
        self._file.truncate()
        self._sizes.truncate(int(self._doc_idx.view()[-1]))
        self.n_tokens = self._doc_start_tokens

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes.view()

    @property
    def doc_idx(self) -> np.ndarray:
        return self._doc_idx.view()

    @property
    def n_items(self) -> int:
        return len(self._sizes)

    @property
    def n_documents(self) -> int:
        return len(self._doc_idx) - 1

    def finish(self, idx_path: str | Path) -> None:
        self._file.close()
        write_index(idx_path, self.dtype, self._sizes.view(), self._doc_idx.view())

    def close(self) -> None:
        self._file.close()


class _GrowableArray:
    """An append-only numpy array (amortised doubling), so millions of sizes cost 4 bytes each, not a Python int."""

    def __init__(self, dtype):
        self._data = np.empty(1024, dtype=dtype)
        self._n = 0

    def append(self, value) -> None:
        if self._n == len(self._data):
            self._data = np.resize(self._data, 2 * len(self._data))
        self._data[self._n] = value
        self._n += 1

    def truncate(self, n: int) -> None:
        self._n = min(self._n, n)

    def __len__(self) -> int:
        return self._n

    def view(self) -> np.ndarray:
        return self._data[: self._n]


def _paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class BinIdxDataset:
    """A memory-mapped binidx pair (ours or RWKV-LM's / Megatron's).

    `tokens` is the whole `.bin` as one flat array (its length is what RWKV-LM calls data_size); `dataset[i]` is
    item i; `document(d)` is document d (all its items). Nothing is read into RAM.
    """

    def __init__(self, prefix: str | Path | None = None, *, bin_path: str | Path | None = None,
                 idx_path: str | Path | None = None):
        if prefix is not None:
            bin_path, idx_path = _paths(prefix)
        if bin_path is None or idx_path is None:
            raise TypeError("BinIdxDataset needs a prefix or both bin_path and idx_path")
        self.bin_path, self.idx_path = Path(bin_path), Path(idx_path)
        for p in (self.bin_path, self.idx_path):
            if not p.is_file():
                raise DataError(f"{p}: no such file (expected the pair {self.bin_path.name} + {self.idx_path.name})")
        raw = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        if len(raw) < HEADER.size:
            raise DataError(f"{self.idx_path}: too short for a binidx index ({len(raw)} bytes)")
        magic, version, code, n_items, n_docs = HEADER.unpack(bytes(raw[: HEADER.size]))
        if magic != MAGIC:
            raise DataError(f"{self.idx_path}: not a binidx index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise DataError(f"{self.idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPES:
            raise DataError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        expected = HEADER.size + 4 * n_items + 8 * n_items + 8 * n_docs
        if len(raw) != expected:
            raise DataError(f"{self.idx_path}: {len(raw)} bytes, but its header describes {expected} (truncated?)")
        off = HEADER.size
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=n_items, offset=off)
        off += 4 * n_items
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=n_items, offset=off)
        off += 8 * n_items
        self.doc_idx = np.frombuffer(raw, dtype=np.int64, count=n_docs, offset=off)
        bin_bytes = os.path.getsize(self.bin_path)
        if bin_bytes % self.dtype.itemsize:
            raise DataError(f"{self.bin_path}: size {bin_bytes} is not a multiple of the {self.dtype} item size")
        if n_items and self.pointers[-1] + self.sizes[-1] * self.dtype.itemsize > bin_bytes:
            raise DataError(f"{self.bin_path}: shorter than its index says (truncated?)")
        n = bin_bytes // self.dtype.itemsize
        # np.memmap refuses empty files; an empty dataset is still a valid (useless) one
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype)

    @property
    def num_tokens(self) -> int:
        """Tokens in `.bin` (RWKV-LM's data_size / my_exit_tokens)."""
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def get(self, offset: int, length: int) -> np.ndarray:
        """`length` tokens of the flat stream from token `offset` (RWKV-LM's `get(idx=0, offset, length)`)."""
        return self.tokens[offset : offset + length]

    @property
    def num_documents(self) -> int:
        return max(len(self.doc_idx) - 1, 0)

    def document_span(self, d: int) -> tuple[int, int]:
        """(first token, end token) of document d in the flat stream."""
        first, end = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if first == end:
            return 0, 0
        start = int(self.pointers[first]) // self.dtype.itemsize
        stop = int(self.pointers[end - 1]) // self.dtype.itemsize + int(self.sizes[end - 1])
        return start, stop

    def document_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised `document_span` for all documents: (starts, ends) as int64 arrays."""
        first, end = self.doc_idx[:-1], self.doc_idx[1:]
        nonempty = end > first
        item_start = self.pointers // self.dtype.itemsize
        starts = np.zeros(self.num_documents, dtype=np.int64)
        ends = np.zeros(self.num_documents, dtype=np.int64)
        starts[nonempty] = item_start[first[nonempty]]
        last = end[nonempty] - 1
        ends[nonempty] = item_start[last] + self.sizes[last]
        return starts, ends

    def document(self, d: int) -> np.ndarray:
        start, stop = self.document_span(d)
        return self.tokens[start:stop]
