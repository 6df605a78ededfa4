import json
from pathlib import Path

import pytest

from rwkvkit.tokenizer import WorldTokenizer


@pytest.fixture(scope="session")
def stdlib_lines() -> list[str]:
    """Real text present on every machine: lines of the Python standard library's own sources (~1 MB)."""
    folder = Path(json.__file__).resolve().parents[1]
    lines = []
    for file in sorted(folder.glob("*.py"))[:40]:
        lines += file.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    return lines


@pytest.fixture(scope="session")
def official():
    """The oracle: the official rwkv package's TRIE_TOKENIZER on its own vocab file."""
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    return rwkv_tokenizer.TRIE_TOKENIZER(str(Path(rwkv_tokenizer.__file__).parent / "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="session")
def world():
    """The product default: the native engine (the suite requires pyrwkv-tokenizer, a base dependency here)."""
    return WorldTokenizer(engine="native")


@pytest.fixture(scope="session")
def world_py():
    return WorldTokenizer(engine="python")


@pytest.fixture(scope="session", params=["native", "python"])
def engine(request, world, world_py):
    return {"native": world, "python": world_py}[request.param]


@pytest.fixture(scope="session")
def shared_texts(shared_dir) -> list[str]:
    texts = []
    for name in ("demo.jsonl", "lambada_test.jsonl"):
        with open(shared_dir / "data" / name, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    return texts
