"""Shared by the data tests (a uniquely named module: every test folder has its own conftest.py)."""

import pytest


class ByteTokenizer:
    """A stand-in for the World tokenizer: one token per UTF-8 byte, id = byte + 1 (the World ids of single bytes)."""

    vocab_size = 65536

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) - 1 for i in ids).decode("utf-8", errors="replace")


def world_tokenizer():
    """The real World tokenizer, or skip while rwkvkit.tokenizer is not there."""
    try:
        from rwkvkit.tokenizer import get_tokenizer
    except ImportError:
        pytest.skip("rwkvkit.tokenizer is not available")
    return get_tokenizer("world")
