"""Tokenizers for RWKV models: `get_tokenizer("world")` (World models), `get_tokenizer("neox", path)` (Pile/Raven).

Every tokenizer has `encode(str) -> list[int]`, `encode_batch(list[str])`, `decode(ids, errors="replace") -> str`,
`decode_bytes(ids) -> bytes`, `stream()` (incremental decoding for generation), `vocab_size` and `eos_id` (0).
"""

from __future__ import annotations

from functools import lru_cache
from os import PathLike
from pathlib import Path

from rwkvkit.errors import TokenizerError
from rwkvkit.tokenizer.base import StreamDecoder, Tokenizer
from rwkvkit.tokenizer.neox import NeoXTokenizer
from rwkvkit.tokenizer.world import WORLD_VOCAB_SIZE, WorldTokenizer

__all__ = [
    "NeoXTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "WorldTokenizer",
    "get_tokenizer",
    "tokenizer_for_vocab",
]

# Model vocab sizes: the 20B tokenizer has 50277 ids, and some Pile models pad the embedding to 50304.
NEOX_VOCAB_SIZES = (50277, 50304)
_WORLD_NAMES = ("world", "rwkv_vocab_v20230424")
_NEOX_NAMES = ("neox", "20b")


def get_tokenizer(
    name: str | PathLike | Tokenizer = "world",
    *,
    vocab_file: str | PathLike | None = None,
    path: str | PathLike | None = None,
    engine: str = "auto",
) -> Tokenizer:
    """A tokenizer by name: "world" (optionally with a custom `vocab_file`), "neox" (with `path` to
    20B_tokenizer.json, else fetched with huggingface_hub), or the path of a vocab file itself (a .json file is a
    NeoX/HF tokenizer, anything else a World-format vocab). A Tokenizer instance is returned as it is.

    Tokenizers are immutable and loading takes a moment, so equal requests share one instance.
    """
    if isinstance(name, Tokenizer):
        return name
    key = str(name)
    if key.lower() in _WORLD_NAMES:
        return _world(_resolved(vocab_file), engine)
    if key.lower() in _NEOX_NAMES:
        return _neox(_resolved(path))
    file = Path(key).expanduser()
    if file.is_file():
        return _neox(_resolved(file)) if file.suffix.lower() == ".json" else _world(_resolved(file), engine)
    raise TokenizerError(f"unknown tokenizer {key!r}: use 'world', 'neox' or the path of a vocab/tokenizer file")


def tokenizer_for_vocab(vocab_size: int, *, path: str | PathLike | None = None, engine: str = "auto") -> Tokenizer:
    """The tokenizer that a model with this embedding size was trained with (65536: World; 50277/50304: NeoX)."""
    if vocab_size == WORLD_VOCAB_SIZE:
        return get_tokenizer("world", engine=engine)
    if vocab_size in NEOX_VOCAB_SIZES:
        return get_tokenizer("neox", path=path)
    raise TokenizerError(
        f"no known tokenizer for vocab size {vocab_size} (World: {WORLD_VOCAB_SIZE}, NeoX: "
        f"{' or '.join(map(str, NEOX_VOCAB_SIZES))}); pass a tokenizer explicitly"
    )


def _resolved(file: str | PathLike | None) -> str | None:
    return None if file is None else str(Path(file).expanduser().resolve())


@lru_cache(maxsize=8)
def _world(vocab_file: str | None, engine: str) -> WorldTokenizer:
    return WorldTokenizer(vocab_file, engine=engine)


@lru_cache(maxsize=4)
def _neox(path: str | None) -> NeoXTokenizer:
    return NeoXTokenizer(path)
