import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_helpers import ByteTokenizer, world_tokenizer

from rwkvkit.data.binidx import BinIdxDataset
from rwkvkit.data.prepare import RecordOptions, _text_records, main, prepare
from rwkvkit.errors import DataError

QUIET = dict(workers=1, progress=False, log=lambda *a: None)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def documents(prefix) -> list[str]:
    ds = BinIdxDataset(prefix)
    out = []
    for d in range(ds.num_documents):
        doc = ds.document(d)
        assert doc[-1] == 0 and 0 not in doc[:-1]
        out.append(ByteTokenizer().decode(doc[:-1]))
    return out


def test_jsonl_and_text_round_trip_with_repeats(tmp_path, byte_tok):
    texts = ["aa", "bb", "héllo wörld ✓", "cc"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    (tmp_path / "notes.txt").write_text("line one\nline two\n")
    r = prepare([src, tmp_path / "notes.txt"], tmp_path / "out" / "d", tokenizer=byte_tok, repeat=3, seed=7, **QUIET)
    docs = documents(tmp_path / "out" / "d")
    everything = texts + ["line one\nline two\n"]
    assert Counter(docs) == Counter(everything * 3)
    for k in range(3):  # each repeat is one shuffled copy of all documents
        assert sorted(docs[5 * k : 5 * k + 5]) == sorted(everything)
    expected_tokens = 3 * sum(len(t.encode()) + 1 for t in everything)
    assert r.n_tokens == BinIdxDataset(tmp_path / "out" / "d").num_tokens == expected_tokens
    assert not r.has_mask and not (tmp_path / "out" / "d.mask.idx").exists()
    meta = json.loads((tmp_path / "out" / "d.json").read_text())
    assert meta["tokens"] == r.n_tokens and meta["repeat"] == 3 and meta["documents"] == 5 and meta["dtype"] == "uint16"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d.bin", "d.idx", "d.json"]  # no temp leftovers


def test_shuffle_is_seeded_and_no_shuffle_keeps_order(tmp_path, byte_tok):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in ["aa", "bb", "cc", "dd", "ee", "ff"]])

    def run(name, **kw):
        prepare([src], tmp_path / name, tokenizer=byte_tok, repeat=2, **kw, **QUIET)
        return (tmp_path / f"{name}.bin").read_bytes()

    assert run("a", seed=1) == run("b", seed=1)
    assert run("a", seed=1) != run("c", seed=2)
    run("plain", shuffle=False)
    assert documents(tmp_path / "plain") == ["aa", "bb", "cc", "dd", "ee", "ff"] * 2


def test_chat_records_get_a_loss_mask_on_answers(tmp_path, byte_tok):
    src = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi\r\n\n\nthere "},
                      {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
                      {"role": "assistant", "content": "done"}]},
        {"prompt": "2+2?", "response": "4"},
        {"text": "plain"},
    ])
    r = prepare([src], tmp_path / "c", tokenizer=byte_tok, shuffle=False, **QUIET)
    assert r.has_mask
    toks, mask = BinIdxDataset(tmp_path / "c"), BinIdxDataset(tmp_path / "c.mask")
    assert mask.dtype == np.uint8 and (mask.sizes == toks.sizes).all()
    dec = ByteTokenizer().decode
    first = toks.document(0)
    assert dec(first[:-1]) == "System: Be brief.\n\nUser: hi\nthere\n\nAssistant: yo\n\nUser: and?\n\nAssistant: done"
    m = mask.document(0).astype(bool)
    assert dec(first[m][:-1]) == " yo\n\n done" and first[m][-1] == 0  # answers, their separator, the end token
    second, m2 = toks.document(1), mask.document(1).astype(bool)
    assert dec(second[:-1]) == "User: 2+2?\n\nAssistant: 4" and dec(second[m2][:-1]) == " 4"
    assert mask.document(2).all()  # plain text is trained everywhere
    assert r.n_trained == int(np.count_nonzero(mask.tokens))


BAD = [
    ('{"text": "ok"', "malformed JSON"),
    ('["text"]', "expected a JSON object, got list"),
    ('{"body": "x"}', "missing field 'text'"),
    ('{"text": 5}', "field 'text' must be a string, got int"),
    ('{"text": ""}', "empty document"),
    ('{"text": "\\ud800"}', "text is not valid Unicode \\(lone surrogate"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\]: missing 'content'"),
]


@pytest.mark.parametrize("line, reason", BAD)
def test_bad_record_stops_with_file_and_line(tmp_path, byte_tok, line, reason):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}, "", line, {"text": "also good"}])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"^{src}:3: {reason}"):
        prepare([src], out / "d", tokenizer=byte_tok, **QUIET)
    assert list(out.iterdir()) == []  # nothing written, not even temporaries


def test_byte_order_mark_is_not_part_of_the_first_record(tmp_path, byte_tok):
    (tmp_path / "in.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n')
    prepare([tmp_path / "in.jsonl"], tmp_path / "d", tokenizer=byte_tok, **QUIET)
    assert documents(tmp_path / "d") == ["first"]


def test_invalid_utf8_reports_line_and_column(tmp_path, byte_tok):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n')
    with pytest.raises(DataError, match=rf"{src}:2: invalid UTF-8 \(byte 0xff at column 15\)"):
        prepare([src], tmp_path / "d", tokenizer=byte_tok, **QUIET)


def test_skip_bad_skips_and_counts(tmp_path, byte_tok, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}] + [line for line, _ in BAD] + [{"text": "b"}])
    r = prepare([src], tmp_path / "d", tokenizer=byte_tok, skip_bad=True, shuffle=False, **QUIET)
    assert r.n_skipped == len(BAD) and documents(tmp_path / "d") == ["a", "b"]
    assert f"skipped {src}:2: malformed JSON" in capsys.readouterr().err


def test_large_text_file_is_one_document_in_pieces(tmp_path, byte_tok):
    lines = [f"line {i} ✓ {'x' * (i % 50)}\n" for i in range(3000)]  # ~130 KB: several 16 KiB pieces
    (tmp_path / "big.txt").write_text("".join(lines))
    prepare([tmp_path / "big.txt"], tmp_path / "d", tokenizer=byte_tok, workers=2, progress=False, log=lambda *a: None)
    ds = BinIdxDataset(tmp_path / "d")
    assert len(ds) > 1 and ds.num_documents == 1 and documents(tmp_path / "d") == ["".join(lines)]


def test_text_pieces_cut_at_newlines_or_utf8_boundaries(tmp_path):
    (tmp_path / "t.txt").write_bytes("ab\ncd✓✓✓✓ef\ng".encode())
    pieces = list(_text_records(tmp_path / "t.txt", 5))
    assert b"".join(p for _, p, _ in pieces) == "ab\ncd✓✓✓✓ef\ng".encode()
    assert [last for _, _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    for _, p, _ in pieces:
        p.decode("utf-8")  # no piece splits a character
    assert [line for line, _, _ in pieces][0] == 1 and pieces[-1][0] == 3


def test_bad_text_piece_reports_its_line_and_skip_drops_the_whole_file(tmp_path, byte_tok):
    body = b"".join(b"line %d\n" % i for i in range(5000)) + b"oops \xc3\x28\n" + b"tail\n" * 3000
    (tmp_path / "bad.txt").write_bytes(body)
    (tmp_path / "good.txt").write_text("fine\n")
    with pytest.raises(DataError, match=r"bad.txt:5001: invalid UTF-8"):
        prepare([tmp_path / "bad.txt"], tmp_path / "d", tokenizer=byte_tok, **QUIET)
    r = prepare([tmp_path], tmp_path / "out" / "d", tokenizer=byte_tok, skip_bad=True, **QUIET)
    assert r.n_skipped == 1 and documents(tmp_path / "out" / "d") == ["fine\n"]


def test_empty_text_file_is_bad(tmp_path, byte_tok):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match=r"e.txt:1: empty document"):
        prepare([tmp_path / "e.txt"], tmp_path / "d", tokenizer=byte_tok, **QUIET)


def test_too_little_data_for_ctx_len_writes_nothing(tmp_path, byte_tok):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "tiny"}])
    with pytest.raises(DataError, match=r"5 tokens are too few for ctx_len 4: .* at least 3\*ctx_len = 12"):
        prepare([src], tmp_path / "out" / "d", tokenizer=byte_tok, ctx_len=4, **QUIET)
    assert list((tmp_path / "out").iterdir()) == []
    r = prepare([src], tmp_path / "out" / "d", tokenizer=byte_tok, ctx_len=4, repeat=3, **QUIET)
    assert (r.n_tokens, r.magic_prime) == (15, 2)


def test_interrupt_leaves_nothing_and_keeps_the_previous_output(tmp_path, byte_tok):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    prepare([src], tmp_path / "d", tokenizer=byte_tok, **QUIET)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("d.*")}

    class Interrupting(ByteTokenizer):
        def encode_batch(self, texts):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare([src], tmp_path / "d", tokenizer=Interrupting(), repeat=2, **QUIET)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("d.*")} == before


KILLED_RUN = """
import sys, time
from rwkvkit.data.prepare import prepare
class Stuck:
    vocab_size = 65536
    calls = 0
    def encode_batch(self, texts):
        Stuck.calls += 1
        if Stuck.calls > 1:
            time.sleep(60)  # hangs mid-run until killed
        return [[b + 1 for b in t.encode()] for t in texts]
    def decode(self, ids):
        return bytes(i - 1 for i in ids).decode()
prepare([sys.argv[1]], sys.argv[2], tokenizer=Stuck(), workers=1, progress=False)
"""


def test_killed_run_leaves_nothing_that_looks_complete(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "x" * 2000} for _ in range(200)])  # 4 tasks
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(src), str(tmp_path / "out" / "d")])
    deadline = time.time() + 60
    while not list(tmp_path.glob("out/d.stage.bin.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # well into the run, which now hangs in its second task
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p.name for p in (tmp_path / "out").iterdir()]
    assert left and all(".tmp-" in name for name in left), left  # only temporaries, no d.bin / d.idx / d.json


def test_demo_jsonl_end_to_end_matches_the_official_tokenizer(tmp_path, shared_dir, capsys):
    world_tokenizer()
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    oracle = TRIE_TOKENIZER(str(shared_dir / "data" / "rwkv_vocab_v20230424.txt"))
    texts = [json.loads(line)["text"] for line in (shared_dir / "data" / "demo.jsonl").open(encoding="utf-8")]
    expected = {t: oracle.encode(t) + [0] for t in texts}
    code = main([str(shared_dir / "data" / "demo.jsonl"), "--out", str(tmp_path / "demo"), "--repeat", "2",
                 "--ctx-len", "512", "--workers", "2", "--quiet"])
    assert code == 0
    ds = BinIdxDataset(tmp_path / "demo")
    n_tokens = 2 * sum(len(v) for v in expected.values())
    assert ds.num_tokens == n_tokens and ds.num_documents == 2 * len(texts)
    got = Counter(tuple(ds.document(d).tolist()) for d in range(ds.num_documents))
    assert got == Counter(tuple(v) for v in expected.values() for _ in range(2))
    out = capsys.readouterr().out
    from rwkvkit.data.sampler import magic_prime

    assert f"--my_exit_tokens {n_tokens} --magic_prime {magic_prime(n_tokens, 512)} --ctx_len 512" in out


def test_round_trip_failure_is_bad_input(tmp_path):
    class Lossy(ByteTokenizer):
        def decode(self, ids):
            return super().decode(ids).lower()

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": "Capital"}])
    with pytest.raises(DataError, match=r"in.jsonl:2: tokenizer round trip failed"):
        prepare([src], tmp_path / "d", tokenizer=Lossy(), **QUIET)


def test_rerun_without_chat_removes_the_stale_mask(tmp_path, byte_tok):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "q", "response": "a"}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "t"}])
    prepare([chat], tmp_path / "d", tokenizer=byte_tok, **QUIET)
    assert (tmp_path / "d.mask.idx").exists()
    prepare([text], tmp_path / "d", tokenizer=byte_tok, **QUIET)
    assert sorted(p.name for p in tmp_path.glob("d.*")) == ["d.bin", "d.idx", "d.json"]


def test_mask_starts_at_the_first_chat_record_with_ones_before_it(tmp_path, byte_tok):
    src = write_jsonl(tmp_path / "mix.jsonl", [{"text": "plain one"}, {"text": "two"}, {"prompt": "q", "response": "a"}])
    prepare([src], tmp_path / "m", tokenizer=byte_tok, shuffle=False, **QUIET)
    toks, mask = BinIdxDataset(tmp_path / "m"), BinIdxDataset(tmp_path / "m.mask")
    assert (mask.sizes == toks.sizes).all() and (mask.doc_idx == toks.doc_idx).all()
    assert mask.document(0).all() and mask.document(1).all()
    assert ByteTokenizer().decode(toks.document(2)[mask.document(2).astype(bool)][:-1]) == " a"


def test_field_and_format_options(tmp_path, byte_tok):
    src = write_jsonl(tmp_path / "in.jsonl", [{"body": "b", "prompt": "p", "response": "r"}])
    prepare([src], tmp_path / "t", tokenizer=byte_tok, options=RecordOptions(text_field="body", fmt="text"), **QUIET)
    assert documents(tmp_path / "t") == ["b"]
    prepare([src], tmp_path / "c", tokenizer=byte_tok, options=RecordOptions(text_field="body", fmt="chat"), **QUIET)
    assert documents(tmp_path / "c") == ["User: p\n\nAssistant: r"]
    with pytest.raises(DataError, match="missing field 'messages'"):
        prepare([write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])], tmp_path / "x", tokenizer=byte_tok,
                options=RecordOptions(fmt="chat"), **QUIET)
