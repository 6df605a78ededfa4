"""The World tokenizer gives the official TRIE_TOKENIZER's ids on everything, with both engines."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkvkit.errors import TokenizerError
from rwkvkit.tokenizer import WorldTokenizer, get_tokenizer
from rwkvkit.tokenizer.reference import _read_common_lines, _read_lines, read_vocab
from rwkvkit.tokenizer.world import VOCAB_NAME, find_world_vocab

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Unicode without lone surrogates (those are not UTF-8 encodable; tested separately)
unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)

SAMPLES = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tpass\r\n",
    "你好，世界。今天天气很好！日本語のテキスト、한국어 텍스트",
    "Emoji 😀🇫🇷👩‍👩‍👧‍👦 and symbols ∑∫√∞ ≠ ≤",
    "Ελληνικά Русский العربية עברית हिन्दी ไทย",
    " " * 300 + "x" + "\n" * 70 + "0123456789" * 30 + "\t" * 40,
    "User: hi\n\nAssistant: <think>\n</think>",
    "<|endoftext|> is plain text here",
    "".join(map(chr, range(256))),
    "\x00\x01\x7f\x80\xff\u0100\u07ff\u0800\uffff\U00010000\U0010ffff",
]


def test_vocab_copies_read_identically_and_match_the_official(official, shared_dir):
    rwkv = pytest.importorskip("rwkv")
    files = [find_world_vocab(), Path(rwkv.__file__).parent / VOCAB_NAME, shared_dir / "data" / VOCAB_NAME]
    vocabs = [read_vocab(f) for f in files]
    assert vocabs[0] == official.idx2token
    assert all(v == vocabs[0] for v in vocabs[1:])
    assert len(vocabs[0]) == 65529 and vocabs[0][1] == b"\x00" and vocabs[0][256] == b"\xff"


def test_default_tokenizer(world):
    assert world.engine == "native" and world.vocab_size == 65536 and world.eos_id == 0
    assert world.encode("\n") == [11] and world.encode("\n\n") == [261] and world.encode("User") == [24281]


@pytest.mark.parametrize("text", SAMPLES)
def test_samples_match_official(engine, official, text):
    ids = engine.encode(text)
    assert ids == official.encode(text)
    assert engine.decode(ids) == text


def test_every_single_byte(engine, official):
    for byte in range(256):
        assert engine.encode_bytes(bytes([byte])) == [byte + 1]
    data = bytes(range(256)) + bytes(range(255, -1, -1))
    assert engine.encode_bytes(data) == official.encodeBytes(data)
    assert engine.decode_bytes(engine.encode_bytes(data)) == data


@SETTINGS
@given(text=unicode_text)
def test_random_unicode_matches_official(engine, official, text):
    ids = engine.encode(text)
    assert ids == official.encode(text)
    assert engine.decode(ids) == text


@SETTINGS
@given(data=st.binary(max_size=80))
def test_random_bytes_match_official(engine, official, data):
    ids = engine.encode_bytes(data)
    assert ids == official.encodeBytes(data)
    assert engine.decode_bytes(ids) == data


@st.composite
def token_soup(draw, vocab_texts):
    """Concatenations of vocab tokens plus stray characters: every join is a place where greedy matching can err."""
    parts = draw(st.lists(st.one_of(st.sampled_from(vocab_texts), unicode_text), max_size=12))
    return "".join(parts)


def test_token_concatenations_match_official(engine, official):
    vocab_texts = []
    for token in official.idx2token.values():
        try:
            vocab_texts.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            pass

    @SETTINGS
    @given(text=token_soup(vocab_texts))
    def check(text):
        assert engine.encode(text) == official.encode(text)

    check()


def test_real_text_lines_match_official(world, world_py, official, stdlib_lines):
    expected = [official.encode(line) for line in stdlib_lines]
    assert len(stdlib_lines) > 10_000
    assert world.encode_batch(stdlib_lines) == expected
    assert [world.encode(line) for line in stdlib_lines[:3000]] == expected[:3000]
    assert world_py.encode_batch(stdlib_lines[:3000]) == expected[:3000]
    whole = "".join(stdlib_lines)
    ids = world.encode(whole)
    assert ids == official.encode(whole)
    assert world.decode(ids) == whole


def test_shared_corpus_matches_official(world, official, shared_texts):
    assert world.encode_batch(shared_texts) == [official.encode(t) for t in shared_texts]


@pytest.mark.parametrize("text", ["\ud800", "ok \udcff tail", "\udbff\udfff"])
def test_lone_surrogates_are_a_clear_error(engine, text):
    with pytest.raises(TokenizerError, match="lone surrogate"):
        engine.encode(text)
    with pytest.raises(TokenizerError, match="lone surrogate"):
        engine.encode_batch(["fine", text])


def test_surrogatepass_bytes_are_the_documented_fallback(engine, official):
    data = "a\ud800b\udfff".encode("utf-8", "surrogatepass")
    ids = engine.encode_bytes(data)
    assert ids == official.encodeBytes(data)
    assert engine.decode_bytes(ids).decode("utf-8", "surrogatepass") == "a\ud800b\udfff"


def test_decoding_invalid_utf8(world):
    # "世" is e4 b8 96: cut after two bytes, then 0xff (id 256), which is never valid in UTF-8
    ids = world.encode_bytes(b"ok \xe4\xb8") + [256]
    assert world.decode_bytes(ids) == b"ok \xe4\xb8\xff"
    assert world.decode(ids) == "ok \ufffd\ufffd"
    with pytest.raises(TokenizerError, match="invalid UTF-8"):
        world.decode(ids, errors="strict")


def test_decode_ids(world, monkeypatch):
    assert world.decode([]) == "" and world.decode_bytes([]) == b""
    assert world.decode([0]) == "" and world.decode([24281, 0, 11]) == "User\n"  # 0 = end of document
    assert world.decode(i for i in [24281]) == "User" and world.decode(24281) == "User"
    np = pytest.importorskip("numpy")
    assert world.decode(np.array([24281, 11])) == "User\n"
    long = [24281, 11] * 2000  # long inputs take the vectorised path
    assert world.decode(long) == "User\n" * 2000 and world.decode(np.array(long)) == "User\n" * 2000
    monkeypatch.setattr("rwkvkit.tokenizer.base._GATHER_SLICE", 1000)  # several slices
    assert world.decode(long) == "User\n" * 2000
    for bad in (65530, 65535, -1, 1 << 40, 1.5, "x", None):
        for prefix in ([24281], long):
            with pytest.raises(TokenizerError, match="not in the world vocabulary"):
                world.decode(prefix + [bad])
    with pytest.raises(TypeError):
        world.decode("User")


@SETTINGS
@given(text=unicode_text)
def test_stream_decoder_never_splits_a_character(world, text):
    stream, pieces = world.stream(), []
    for token in world.encode(text):
        pieces.append(stream.push(token))
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text


def test_stream_decoder_holds_back_and_replaces(world):
    stream = world.stream()
    assert stream.push(world.encode_bytes(b"\xf0\x9f")) == "" and stream.pending == b"\xf0\x9f"
    assert stream.push(world.encode_bytes(b"\x98\x80!")) == "\U0001f600!" and stream.pending == b""
    assert stream.push([129]) == "\ufffd"  # a byte that can never start a character is replaced at once
    assert stream.push(world.encode_bytes(b"\xe4")) == ""
    assert stream.flush() == "\ufffd"  # the stream ended mid-character
    with pytest.raises(TokenizerError):
        world.stream(errors="strict").push([129])


def _write_vocab(path: Path, newline: str) -> dict[int, bytes]:
    tokens = [bytes([b]) for b in range(256)] + [b"ab", "héllo".encode(), b"\xe4\xb8", "世界".encode(), b"a" * 5]
    lines = []
    for token_id, token in enumerate(tokens, start=1):
        try:
            literal = repr(token.decode("utf-8"))
        except UnicodeDecodeError:
            literal = repr(token)
        lines.append(f"{token_id} {literal} {len(token)}")
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return dict(enumerate(tokens, start=1))


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_custom_vocab_file(tmp_path, newline):
    vocab = _write_vocab(tmp_path / "v.txt", newline)
    assert read_vocab(tmp_path / "v.txt") == vocab
    native = get_tokenizer("world", vocab_file=tmp_path / "v.txt")
    python = WorldTokenizer(tmp_path / "v.txt", engine="python")
    assert native.engine == "native" and native.vocab_size == 320
    text = "xaaaaaab héllo 世界世 abab"
    expected = [121, 261, 257, 33, 258, 33, 260, 259, 151, 33, 257, 257]
    assert native.encode(text) == python.encode(text) == expected
    official = pytest.importorskip("rwkv.rwkv_tokenizer").TRIE_TOKENIZER(str(tmp_path / "v.txt"))
    assert official.encode(text) == expected
    assert native.decode(native.encode(text)) == text


@pytest.mark.parametrize(
    "content, message",
    [
        ("1 'a' 2\n", "bytes but the line says"),
        ("1 'a' x\n", "not a '<id> <literal> <length>'"),
        ("1 foo 1\n", "not a '<id> <literal> <length>'"),
        ("1 'a' 1\n1 'b' 1\n", "repeated"),
        ("1 'a' 1\n", "lacks single-byte tokens"),
    ],
)
def test_malformed_vocab_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "bad.txt").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=message):
        WorldTokenizer(tmp_path / "bad.txt")



def test_fast_vocab_reader_equals_the_careful_one_on_the_real_file():
    raw = find_world_vocab().read_bytes()
    for data in (raw, raw.replace(b"\n", b"\r\n")):
        fast = _read_common_lines(data)
        assert fast is not None and list(fast.items()) == list(_read_lines(data, Path("v")).items())


SINGLE_BYTES = "".join(f"{b + 1} {bytes([b])!r} 1\n" for b in range(256))
# Lines the regex reads, lines it leaves to the literal parser, and lines that both readers must reject
ODD_LINES = ["300 'ab' 2", "301 'a b' 3", "302 \"it's\" 4", "303 'a\\'b' 3", "304 b'\\xe4\\xb8' 2", "305 '\\n\\t' 2",
             "306 'x' 1\r\r", "+307 'cd' 2", "0308 'ef' 2", "309 'gh'  2", "310 'ij' 2 ", " 311 'kl' 2", "312 'm'n' 3",
             "313 '' 0", "0 'op' 2", "-5 'qr' 2", "314 'st' 9", "315 'ab' 2", "300 'uv' 2", "316 '\\u00e9' 2",
             "317 'é' 2", "318 b'\\xff\\xfe' 2", "319 \"q\" 1", "320 'yz' 2 3", "", "  ", "\r", "321 'a\rb' 3",
             "٣٢٢ 'wx' 2"]


@SETTINGS
@given(st.lists(st.sampled_from(ODD_LINES), max_size=6), st.sampled_from(["\n", "\r\n"]))
def test_fast_vocab_reader_agrees_with_the_careful_one(lines, newline):
    raw = (SINGLE_BYTES + "\n".join(lines)).replace("\n", newline).encode("utf-8")
    fast = _read_common_lines(raw)
    try:
        careful = _read_lines(raw, Path("v"))
    except TokenizerError:
        assert fast is None  # read_vocab then raises the careful reader's error, with the line
    else:
        assert fast is not None and list(fast.items()) == list(careful.items())


def test_missing_vocab_file(tmp_path):
    with pytest.raises(TokenizerError, match="cannot read vocab file"):
        WorldTokenizer(tmp_path / "nope.txt")


def test_without_the_native_package(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "pyrwkv_tokenizer", None)  # makes the import fail
    _write_vocab(tmp_path / "v.txt", "\n")
    assert WorldTokenizer(tmp_path / "v.txt").engine == "python"
    with pytest.raises(TokenizerError, match="pyrwkv-tokenizer"):
        WorldTokenizer(tmp_path / "v.txt", engine="native")


def test_no_package_ships_the_vocab(monkeypatch):
    monkeypatch.setattr("rwkvkit.tokenizer.world.VOCAB_PACKAGES", ("no_such_package_xyz",))
    with pytest.raises(TokenizerError, match="pip install rwkv"):
        find_world_vocab()


@pytest.fixture
def small_pieces(monkeypatch):
    """Long-text parallel encoding at a scale where short test texts get cut into many pieces."""
    monkeypatch.setattr("rwkvkit.tokenizer.world.PIECE_MIN_CHARS", 600)
    monkeypatch.setattr("rwkvkit.tokenizer.world.PIECE_OVERLAP", 200)
    monkeypatch.setenv("RAYON_NUM_THREADS", "64")


def test_long_text_in_parallel_pieces(world, official, stdlib_lines, small_pieces):
    text = "".join(stdlib_lines[:4000])
    expected = official.encode(text)
    for pieces in (2, 5, 64):
        assert world._encode_in_pieces(text, pieces) == expected  # the pieces met: no fallback
    assert world.encode(text) == expected
    # In a run of spaces longer than the overlap, walks out of step by 2300 bytes (not a multiple of the
    # 128-space token) never meet: then the text is encoded in one piece
    spaces = "x" + " " * 5000 + "y"
    assert world._encode_in_pieces(spaces, 2) is None
    assert world.encode(spaces) == official.encode(spaces)


def test_long_token_soup_in_parallel_pieces(world, official, small_pieces):
    vocab_texts = [t.decode("utf-8") for t in official.idx2token.values() if len(t) > 1 and t.isascii()]
    vocab_texts += ["你好", "世界", "😀", "\n\n", " " * 33, "🇫🇷"]

    @settings(SETTINGS, max_examples=50)
    @given(text=st.lists(st.sampled_from(vocab_texts), min_size=200, max_size=500).map("".join))
    def check(text):
        assert world.encode(text) == official.encode(text)

    check()
