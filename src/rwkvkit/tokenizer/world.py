"""The RWKV World tokenizer (`rwkv_vocab_v20230424`): greedy longest match on UTF-8 bytes, 65536 ids.

Id 0 is end-of-document (it decodes to nothing), ids 1..256 are the single bytes 0x00..0xff, longer tokens follow.
Encoding gives the same ids as the official `TRIE_TOKENIZER`. The engine is the Rust `pyrwkv-tokenizer` package
where it is installed (proved exact by the tests), else the pure-Python trie in `reference.py`; decoding is ours.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from functools import cached_property
from os import PathLike
from pathlib import Path

from rwkvkit.errors import TokenizerError
from rwkvkit.tokenizer.base import Tokenizer
from rwkvkit.tokenizer.reference import TrieEncoder, read_vocab

VOCAB_NAME = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536
# Registry packages that ship the official vocab file (no download at run time). The first one is also the engine.
VOCAB_PACKAGES = ("pyrwkv_tokenizer", "rwkv", "rwkv_tokenizer")
ENGINES = ("auto", "native", "python")
# A long text is encoded as overlapping pieces on all cores (see _encode_in_pieces): pieces of at least this many
# characters, overlapping by 2 * PIECE_OVERLAP characters around each cut (PIECE_MIN_CHARS > 2 * PIECE_OVERLAP).
PIECE_MIN_CHARS = 1 << 16
PIECE_OVERLAP = 1024


def find_world_vocab() -> Path:
    """The official World vocab file from an installed package that ships it."""
    for package in VOCAB_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / VOCAB_NAME
            if candidate.is_file():
                return candidate
    raise TokenizerError(
        f"the World vocab {VOCAB_NAME} was not found in any of the packages {', '.join(VOCAB_PACKAGES)}: "
        "`pip install rwkv` ships it, or pass vocab_file=..."
    )


class WorldTokenizer(Tokenizer):
    """World tokenizer. `engine`: "auto" (native if available), "native" (require it) or "python"."""

    name = "world"

    def __init__(self, vocab_file: str | PathLike | None = None, engine: str = "auto"):
        if engine not in ENGINES:
            raise TokenizerError(f"unknown tokenizer engine {engine!r}: choose one of {', '.join(ENGINES)}")
        self.vocab_file = Path(vocab_file) if vocab_file is not None else find_world_vocab()
        vocab = read_vocab(self.vocab_file)
        self._id_to_bytes = {self.eos_id: b"", **vocab}
        # The model's embedding must cover every id; RWKV pads its vocabularies to a multiple of 64 (65530 -> 65536).
        self.vocab_size = -(-(max(vocab) + 1) // 64) * 64
        self._vocab = vocab
        self._trie: TrieEncoder | None = None
        self._native = _native_engine(self.vocab_file, vocab) if engine != "python" else None
        if engine == "native" and self._native is None:
            raise TokenizerError(
                "the native World engine needs the `pyrwkv-tokenizer` package (pip install pyrwkv-tokenizer) "
                f"and a vocab it reads like we do ({self.vocab_file})"
            )
        self.engine = "native" if self._native is not None else "python"
        self._engine_asked = engine

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__} (use encode_bytes for bytes)")
        if self._native is not None:
            try:
                return self._encode_native(text)
            except UnicodeEncodeError:
                _utf8(text)  # raises our error, which says where the culprit is
                raise
        return self._python.encode(_utf8(text))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode raw bytes, which need not be valid UTF-8 (the official `encodeBytes`)."""
        data = bytes(data)
        if self._native is not None:
            try:
                return self._encode_native(data.decode("utf-8"))
            except UnicodeDecodeError:
                pass  # the native engine takes str only; bytes that are not UTF-8 go through the Python trie
        return self._python.encode(data)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Encode many texts; the native engine spreads them over all cores (RAYON_NUM_THREADS limits that)."""
        texts = list(texts)
        if self._native is None:
            return [self.encode(text) for text in texts]
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode_batch takes str items, got {type(text).__name__}")
        try:
            return self._native.encode_batch(texts)
        except UnicodeEncodeError:
            for text in texts:  # find the culprit for the message
                _utf8(text)
            raise

    def _encode_native(self, text: str) -> list[int]:
        pieces = min(_worker_threads(), len(text) // PIECE_MIN_CHARS)
        if pieces >= 2:
            ids = self._encode_in_pieces(text, pieces)
            if ids is not None:
                return ids
        return self._native.encode(text)

    def _encode_in_pieces(self, text: str, pieces: int) -> list[int] | None:
        """Encode a long text as `pieces` overlapping pieces in parallel and stitch their ids together.

        Greedy matching from a token boundary depends only on the bytes that follow it. So where the ids so far and
        the next piece's ids both have a token starting at the same byte of the overlap (and the ids so far are
        sure there: the token fits before their piece's end), the next piece's ids from there on are the
        whole text's ids. Two greedy walks meet within a few tokens on real text; when they do not (a run of
        spaces longer than the overlap), None tells the caller to encode in one piece.
        """
        n = len(text)
        cuts = [n * k // pieces for k in range(pieces + 1)]
        spans = [(max(cuts[k] - PIECE_OVERLAP, 0), min(cuts[k + 1] + PIECE_OVERLAP, n)) for k in range(pieces)]
        encoded = self._native.encode_batch([text[start:end] for start, end in spans])
        lengths, max_len = self._token_lengths
        ids = encoded[0]
        for k in range(1, pieces):
            piece_ids = encoded[k]
            overlap = len(text[spans[k][0] : spans[k - 1][1]].encode("utf-8"))  # byte positions are relative to it
            sure_starts = {}  # byte position -> index in ids of a token starting there that is surely right
            position, i = overlap, len(ids)
            while i > 0 and position > 0:
                i -= 1
                position -= lengths[ids[i]]
                if 0 <= position <= overlap - max_len:
                    sure_starts[position] = i
            position, meet = 0, None
            for j, token_id in enumerate(piece_ids):
                if position in sure_starts:
                    meet = sure_starts[position], j
                    break
                position += lengths[token_id]
                if position > overlap - max_len:
                    break
            if meet is None:
                return None
            ids = ids[: meet[0]] + piece_ids[meet[1] :]
        return ids

    @cached_property
    def _token_lengths(self) -> tuple[list[int], int]:
        """Byte length per id and the longest, for stitching pieces (built on first use: most texts are never cut)."""
        lengths = [len(self._id_to_bytes.get(i, b"")) for i in range(max(self._vocab) + 1)]
        return lengths, max(lengths)

    @property
    def _python(self) -> TrieEncoder:
        if self._trie is None:  # built on first use: with the native engine it serves only non-UTF-8 bytes
            self._trie = TrieEncoder(self._vocab)
        return self._trie

    def __reduce__(self):
        # Rebuilt from its file in another process (the native engine cannot be pickled)
        return type(self), (self.vocab_file, self._engine_asked)

    def __repr__(self) -> str:
        return f"WorldTokenizer(vocab_file={str(self.vocab_file)!r}, engine={self.engine!r})"


def _native_engine(vocab_file: Path, vocab: dict[int, bytes]):
    """The Rust encoder on the same file, or None when it is missing or reads the file differently from us."""
    try:
        import pyrwkv_tokenizer
    except ImportError:
        return None
    try:
        native = pyrwkv_tokenizer.WorldTokenizer(str(vocab_file))
    except BaseException as e:  # a Rust panic on a malformed file surfaces as pyo3's PanicException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None
    if native.vocab_size() != max(vocab) + 1:
        return None
    if vocab_file.parent == Path(pyrwkv_tokenizer.__file__).parent:
        return native  # the package's own vocab: the test suite proves that engine exact on it
    # Any other file: every token that is valid UTF-8 must encode to itself alone, as it does in our reader.
    # (Tokens that are not valid UTF-8 cannot be passed to the native engine, which takes str.)
    texts, expected = [], []
    for token_id, token in vocab.items():
        try:
            texts.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        expected.append([token_id])
    return native if native.encode_batch(texts) == expected else None


def _worker_threads() -> int:
    """How many threads the native engine's pool (rayon) runs: RAYON_NUM_THREADS, else the usable cores."""
    try:
        return max(int(os.environ.get("RAYON_NUM_THREADS", "")), 1)
    except ValueError:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"text cannot be encoded as UTF-8: {e.object[e.start]!r} at index {e.start} is a lone surrogate; clean "
            "the text, or tokenize its bytes with encode_bytes(text.encode('utf-8', 'surrogatepass'))"
        ) from None
