"""Pure-Python World tokenizer core: the vocab file reader and a byte trie doing greedy longest match.

This is the reference the tests hold the fast engine to, and the engine itself where the native package is missing.
"""

from __future__ import annotations

import ast
import re
from os import PathLike
from pathlib import Path

from rwkvkit.errors import TokenizerError


# A line in the form most vocab lines take: `<id> '<text without quote or backslash>' <length>`, or (the second
# branch) any other line, which _parse_line then reads. One match per line, in order (see _read_common_lines).
_LINE = re.compile(rb"^(?:([0-9]+) '([^'\\\n]*)' ([0-9]+)|.*?)\r?$", re.MULTILINE)


def read_vocab(path: str | PathLike) -> dict[int, bytes]:
    """Parse a World vocab file (`<id> <python str or bytes literal> <byte length>` per line, LF or CRLF)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read vocab file {path}: {e.strerror or e}") from None
    vocab = _read_common_lines(raw)
    return vocab if vocab is not None else _read_lines(raw, path)


def _read_common_lines(raw: bytes) -> dict[int, bytes] | None:
    """The fast reader: most lines by one regex over the whole file, the rest by _parse_line. It returns what
    _read_lines would, or None for a file that _read_lines would reject (which then says why and where)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = raw.split(b"\n")
    matches = _LINE.findall(raw)
    if len(matches) != len(lines):  # cannot happen (one match per line), but then the careful reader decides
        return None
    vocab: dict[int, bytes] = {}
    n_lines = 0
    for (token_id, token, length), line in zip(matches, lines):
        if token_id:  # the common form: the token is the quoted text's UTF-8 as it stands
            token_id = int(token_id)
            if len(token) != int(length):
                return None
        elif not line.strip():
            continue
        else:
            try:
                token_id, token, length = _parse_line(line)
            except (ValueError, SyntaxError):
                return None
            if len(token) != length:
                return None
        vocab[token_id] = token
        n_lines += 1
    if len(vocab) != n_lines or 0 in vocab or min(vocab, default=0) < 0 or b"" in vocab.values():
        return None
    tokens = set(vocab.values())
    if len(tokens) != n_lines or any(bytes([b]) not in tokens for b in range(256)):
        return None
    return vocab


def _read_lines(raw: bytes, path: Path) -> dict[int, bytes]:
    """The careful reader: line by line, raising at the first line that is wrong."""
    vocab: dict[int, bytes] = {}
    seen: set[bytes] = set()
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if not line_bytes.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            token_id, token, length = _parse_line(line_bytes)
        except (ValueError, SyntaxError) as e:
            raise TokenizerError(f"{where}: not a '<id> <literal> <length>' vocab line ({e})") from None
        if not token or len(token) != length:
            raise TokenizerError(f"{where}: token is {len(token)} bytes but the line says {length}")
        if token_id < 1 or token_id in vocab or token in seen:
            raise TokenizerError(f"{where}: id {token_id} is 0, negative or repeated, or the token is repeated")
        vocab[token_id] = token
        seen.add(token)
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        # Greedy matching relies on every single byte being a token: then any byte string can be encoded.
        raise TokenizerError(f"{path}: vocab lacks single-byte tokens (first missing byte: {missing[0]:#04x})")
    return vocab


def _parse_line(line_bytes: bytes) -> tuple[int, bytes, int]:
    """(id, token, the length the line states); ValueError or SyntaxError for a line that is not one."""
    line = line_bytes.rstrip(b"\r").decode("utf-8")
    first, last = line.index(" "), line.rindex(" ")
    return int(line[:first]), _parse_literal(line[first + 1 : last]), int(line[last + 1 :])


def _parse_literal(literal: str) -> bytes:
    quote = literal[:1]
    if quote in ("'", '"') and len(literal) >= 2 and literal[-1] == quote and "\\" not in literal:
        return literal[1:-1].encode("utf-8")  # fast path: a plain quoted string needs no evaluation
    value = ast.literal_eval(literal)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    raise ValueError(f"{literal!r} is neither a str nor a bytes literal")


class TrieEncoder:
    """Greedy longest-match encoder over bytes, as the official `TRIE_TOKENIZER` defines the World encoding."""

    def __init__(self, vocab: dict[int, bytes]):
        # A node maps a byte value to [id of the token ending there (0: none), child node].
        self._root: dict[int, list] = {}
        for token_id, token in vocab.items():
            node = self._root
            for byte in token[:-1]:
                node = node.setdefault(byte, [0, {}])[1]
            node.setdefault(token[-1], [0, {}])[0] = token_id
        self._max_len = max(map(len, vocab.values()))

    def encode(self, data: bytes) -> list[int]:
        root, max_len, out, n, i = self._root, self._max_len, [], len(data), 0
        while i < n:
            node, end, best_id, best_end = root, i, 0, i
            for byte in data[i : i + max_len]:
                entry = node.get(byte)
                if entry is None:
                    break
                end += 1
                token_id, node = entry
                if token_id:
                    best_id, best_end = token_id, end
            out.append(best_id)  # best_end > i: read_vocab guarantees every single byte is a token
            i = best_end
        return out
