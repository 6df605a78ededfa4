"""The GPT-NeoX 20B tokenizer of RWKV-4 Pile/Raven models (`20B_tokenizer.json`, vocab 50277) via HF `tokenizers`.

The file is not shipped by any package: the user passes its path (ChatRWKV has it as 20B_tokenizer.json), or on a
networked machine with `huggingface_hub` installed it is fetched from the hub (cached by huggingface_hub).
The tokenizer NFC-normalizes its input, so `decode(encode(s)) == unicodedata.normalize("NFC", s)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike
from pathlib import Path

from rwkvkit.errors import TokenizerError
from rwkvkit.tokenizer.base import Tokenizer

NEOX_HUB_REPO = "EleutherAI/gpt-neox-20b"
NEOX_HUB_FILE = "tokenizer.json"


def find_neox_file(path: str | PathLike | None = None) -> Path:
    """The user's `20B_tokenizer.json`, else the hub's copy of the same tokenizer."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise TokenizerError(f"NeoX tokenizer file not found: {path}")
        return path
    hint = "pass the path of a local 20B_tokenizer.json (ChatRWKV ships one)"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise TokenizerError(f"the NeoX tokenizer needs its JSON file: {hint}, or install huggingface_hub") from None
    try:
        return Path(hf_hub_download(repo_id=NEOX_HUB_REPO, filename=NEOX_HUB_FILE))
    except Exception as e:  # offline, hub errors, permissions: all end the same way for the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerError(f"could not fetch {NEOX_HUB_FILE} of {NEOX_HUB_REPO} ({reason}); {hint}") from None


class NeoXTokenizer(Tokenizer):
    """Byte-level BPE; ids equal `tokenizers.Tokenizer.from_file(path).encode(text).ids` (what ChatRWKV uses)."""

    name = "neox"

    def __init__(self, path: str | PathLike | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = find_neox_file(path)
        try:
            self._hf = HFTokenizer.from_file(str(self.path))
        except Exception as e:
            raise TokenizerError(f"{self.path} is not a tokenizers JSON file ({str(e).strip()[:200]})") from None
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self._id_to_bytes = _byte_table(self._hf)
        # Models pad the embedding to a multiple of 64 (50277 -> 50304); a sampled padding id decodes to nothing,
        # as in the official pipeline (HF tokenizers skips ids it does not know). Ids past the padding still raise.
        for padding_id in range(self.vocab_size, -(-self.vocab_size // 64) * 64):
            self._id_to_bytes.setdefault(padding_id, b"")

    def encode(self, text: str) -> list[int]:
        try:
            return self._hf.encode(text).ids
        except TypeError:  # tokenizers refuses non-str and lone surrogates alike; say which
            _check_text(text)
            raise

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        texts = list(texts)
        try:
            return [encoding.ids for encoding in self._hf.encode_batch(texts)]
        except TypeError:
            for text in texts:
                _check_text(text)
            raise

    def __reduce__(self):
        return type(self), (self.path,)

    def __repr__(self) -> str:
        return f"NeoXTokenizer(path={str(self.path)!r})"


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"text cannot be encoded as UTF-8: {e.object[e.start]!r} at index {e.start} is a lone surrogate"
        ) from None


def _byte_table(hf) -> dict[int, bytes]:
    """id -> bytes, decoding like the HF ByteLevel decoder with its default of skipping special tokens."""
    char_to_byte = {char: byte for byte, char in enumerate(_byte_level_alphabet())}
    special = {token_id for token_id, added in hf.get_added_tokens_decoder().items() if added.special}
    table = {}
    for token, token_id in hf.get_vocab(with_added_tokens=True).items():
        if token_id in special:
            table[token_id] = b""
        elif all(char in char_to_byte for char in token):
            table[token_id] = bytes(char_to_byte[char] for char in token)
        else:  # added tokens such as runs of spaces are stored as plain text
            table[token_id] = token.encode("utf-8")
    return table


def _byte_level_alphabet() -> list[str]:
    """The printable stand-in character of each byte 0..255 used by byte-level BPE (GPT-2's mapping).

    Bytes that are printable Latin-1 characters stand for themselves; the others, in byte order, take the
    code points from U+0100 upwards.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, shifted = [], 256
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(shifted))
            shifted += 1
    return alphabet
