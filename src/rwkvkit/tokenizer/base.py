"""What every rwkvkit tokenizer shares: id -> bytes decoding with clear errors, and the streaming decoder."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from operator import itemgetter

from rwkvkit.errors import TokenizerError

# From this many ids on, decoding gathers bytes with numpy (about 2x the speed of joining Python bytes objects);
# below it numpy's fixed cost per call does not pay off.
_NUMPY_MIN_IDS = 2048
_GATHER_SLICE = 1 << 16


class Tokenizer:
    """Base class. Subclasses fill `_id_to_bytes` and implement `encode` / `encode_batch`.

    `decode` turns ids into text with `errors="replace"` by default (invalid UTF-8 becomes U+FFFD, as in
    `bytes.decode`); `decode_bytes` gives the exact bytes; `stream()` decodes ids as they arrive during generation.
    """

    name: str
    eos_id: int = 0
    vocab_size: int
    _id_to_bytes: dict[int, bytes]
    _blob = None  # all token bytes end to end (numpy), built on the first long decode; see _gather

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = _as_id_list(ids)
        if len(ids) >= _NUMPY_MIN_IDS:
            data = self._gather(ids)
            if data is not None:
                return data
        table = self._id_to_bytes
        try:
            if len(ids) == 1:  # itemgetter with one key returns the item itself, not a tuple
                return table[ids[0]]
            return b"".join(itemgetter(*ids)(table)) if ids else b""
        except (KeyError, TypeError):
            bad = next(i for i in ids if not _is_key(table, i))
            raise TokenizerError(
                f"token id {bad!r} is not in the {self.name} vocabulary (vocab size {self.vocab_size})"
            ) from None

    def _gather(self, ids) -> bytes | None:
        """All token bytes concatenated by vectorised gathers; None for ids it cannot vouch for."""
        import numpy as np

        if self._blob is None:  # _blob is assigned last, so a concurrent call never sees half of these
            size = max(self._id_to_bytes) + 1
            tokens = [self._id_to_bytes.get(i, b"") for i in range(size)]
            self._known = np.zeros(size, dtype=bool)
            self._known[list(self._id_to_bytes)] = True
            self._offsets = np.zeros(size + 1, dtype=np.int32)  # a vocab is far below 2 GiB
            np.cumsum([len(t) for t in tokens], out=self._offsets[1:])
            self._blob = np.frombuffer(b"".join(tokens), dtype=np.uint8)
        try:
            array = np.array(ids)
        except (ValueError, OverflowError):
            return None
        if array.dtype.kind not in "iu" or array.ndim != 1:
            return None  # floats, strings, bools, nested lists: the dict lookup names the culprit
        if array.min() < 0 or array.max() >= len(self._known) or not self._known[array].all():
            return None
        pieces = []
        # Bounded slices keep the temporaries small (cache-friendly) and int32 positions far from overflowing
        for start in range(0, len(array), _GATHER_SLICE):
            chunk = array[start : start + _GATHER_SLICE]
            # Output byte k of token j is blob[start_j + k - out_start_j]: repeat each token's shift over its length
            starts = self._offsets[chunk]
            lengths = self._offsets[chunk + 1] - starts
            out_ends = np.cumsum(lengths, dtype=np.int32)
            positions = np.repeat(starts - (out_ends - lengths), lengths)
            positions += np.arange(int(out_ends[-1]), dtype=np.int32)
            pieces.append(self._blob[positions].tobytes())
        return b"".join(pieces)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        data = self.decode_bytes(ids)
        try:
            return data.decode("utf-8", errors)
        except UnicodeDecodeError as e:
            raise TokenizerError(f"the tokens decode to invalid UTF-8 ({e.reason} at byte {e.start})") from None

    def stream(self, errors: str = "replace") -> StreamDecoder:
        return StreamDecoder(self, errors)


class StreamDecoder:
    """Decodes ids as a model emits them, holding back a UTF-8 character until all of its bytes have arrived.

    One token may carry half of a character (CJK, emoji), so printing each token's own decode shows U+FFFD
    mid-character. `push` returns only complete text; bytes that can never become valid UTF-8 are replaced
    (or raise with errors="strict") as soon as that is certain; `flush` ends the stream and releases what is left.
    """

    def __init__(self, tokenizer: Tokenizer, errors: str = "replace"):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors)

    def push(self, ids: int | Iterable[int]) -> str:
        return self._decode(self._tokenizer.decode_bytes(ids), final=False)

    def flush(self) -> str:
        text = self._decode(b"", final=True)
        self._utf8.reset()
        return text

    @property
    def pending(self) -> bytes:
        """Bytes held back because they start a character that is not complete yet."""
        return self._utf8.getstate()[0]

    def _decode(self, data: bytes, final: bool) -> str:
        try:
            return self._utf8.decode(data, final)
        except UnicodeDecodeError as e:
            self._utf8.reset()
            raise TokenizerError(f"the tokens decode to invalid UTF-8 ({e.reason})") from None


def _as_id_list(ids) -> list | tuple:
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
        ids = ids.tolist()
    if isinstance(ids, int):
        return (ids,)
    if isinstance(ids, (list, tuple)):
        return ids
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"expected token ids, got {type(ids).__name__}")
    return list(ids)


def _is_key(table: dict, key) -> bool:
    try:
        return key in table
    except TypeError:  # unhashable
        return False
