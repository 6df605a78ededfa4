"""The NeoX 20B tokenizer: ids and text as ChatRWKV's PIPELINE gives them, exact bytes, and how the file is found."""

import sys
import types
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkvkit.errors import TokenizerError
from rwkvkit.tokenizer import NeoXTokenizer
from rwkvkit.tokenizer.neox import NEOX_HUB_FILE, NEOX_HUB_REPO

SAMPLES = [
    "Hello  world\n\n   x <|endoftext|> 你好😀",
    "def f(x):\n    return x  # code\r\n\t\t",
    "Ελληνικά Русский العربية 日本語 한국어 👩‍👩‍👧‍👦",
    " " * 40 + "0123456789" * 5,
]


@pytest.fixture(scope="module")
def json_path(shared_dir):
    return shared_dir / "data" / "20B_tokenizer.json"


@pytest.fixture(scope="module")
def neox(json_path):
    return NeoXTokenizer(json_path)


@pytest.fixture(scope="module")
def pipeline(json_path):
    """The oracle: the official PIPELINE with the 20B tokenizer (it needs no model for encode/decode)."""
    utils = pytest.importorskip("rwkv.utils")
    return utils.PIPELINE(None, str(json_path))


def test_vocab(neox):
    assert neox.vocab_size == 50277 and neox.eos_id == 0
    assert neox.encode("\n") == [187] and neox.encode("\n\n") == [535]


@pytest.mark.parametrize("text", SAMPLES)
def test_samples_match_pipeline(neox, pipeline, text):
    ids = neox.encode(text)
    assert ids == pipeline.encode(text)
    assert neox.decode(ids) == pipeline.decode(ids)


def test_real_text_matches_pipeline(neox, pipeline, shared_texts, stdlib_lines):
    texts = shared_texts[:1000] + stdlib_lines[:3000]
    batch = neox.encode_batch(texts)
    assert batch == [pipeline.encode(t) for t in texts]
    assert [neox.decode(ids) for ids in batch] == [pipeline.decode(ids) for ids in batch]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_random_unicode(neox, pipeline, text):
    ids = neox.encode(text)
    assert ids == pipeline.encode(text)
    assert neox.decode(ids) == pipeline.decode(ids) == unicodedata.normalize("NFC", text)


def test_decode_bytes_special_tokens_and_stream(neox, pipeline):
    emoji = neox.encode("😀")
    assert len(emoji) > 1 and neox.decode_bytes(emoji) == "😀".encode()
    assert neox.decode(emoji[:1]) == pipeline.decode(emoji[:1]) == "\ufffd"
    assert neox.decode([0, 1]) == pipeline.decode([0, 1]) == ""  # <|endoftext|>, <|padding|> are skipped
    stream = neox.stream()
    assert [stream.push(i) for i in emoji] == [""] * (len(emoji) - 1) + ["😀"]
    # the models' padding ids (50277..50303) decode to nothing, like the official pipeline; past them: an error
    assert neox.decode([50277, 510, 50303]) == pipeline.decode([50277, 510, 50303]) == "The"
    with pytest.raises(TokenizerError, match="not in the neox vocabulary"):
        neox.decode([50304])


def test_lone_surrogates(neox):
    with pytest.raises(TokenizerError, match="lone surrogate"):
        neox.encode("a\ud800")
    with pytest.raises(TokenizerError, match="lone surrogate"):
        neox.encode_batch(["a", "b\udfff"])
    with pytest.raises(TypeError):
        neox.encode(b"bytes")


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        NeoXTokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON"):
        NeoXTokenizer(tmp_path / "bad.json")


def _fake_hub(monkeypatch, download):
    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = download
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)


def test_hub_download_when_no_path_is_given(monkeypatch, json_path):
    calls = []

    def download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(json_path)

    _fake_hub(monkeypatch, download)
    assert NeoXTokenizer().encode("\n\n") == [535]
    assert calls == [(NEOX_HUB_REPO, NEOX_HUB_FILE)]


def test_hub_failure_is_a_clear_error(monkeypatch):
    def download(repo_id, filename):
        raise OSError("We couldn't connect to the hub\nmore details")

    _fake_hub(monkeypatch, download)
    with pytest.raises(TokenizerError, match=r"could not fetch .*\(We couldn't connect to the hub\); pass the path"):
        NeoXTokenizer()


def test_no_path_and_no_hub_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(TokenizerError, match="install huggingface_hub"):
        NeoXTokenizer()
