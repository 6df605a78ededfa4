"""The parts of `rwkvkit prepare` that are there for speed: worker start-up, and the vectorised round-trip check."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import world_tokenizer

from rwkvkit.data import prepare as prep
from rwkvkit.data.prepare import prepare


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "spawned"])
def test_other_processes_give_the_same_output_however_started(tmp_path, byte_tok, monkeypatch, fork):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " + "é" * (i % 7)}) + "\n" for i in range(300)))
    quiet = dict(tokenizer=byte_tok, repeat=2, progress=False, log=lambda *a: None)
    prepare([src], tmp_path / "one", workers=1, **quiet)
    monkeypatch.setattr(prep, "_can_fork", lambda: fork)
    monkeypatch.setattr(prep, "TASK_BYTES", 1 << 10)  # many tasks, so the other process surely takes some
    prepare([src], tmp_path / "two", workers=2, **quiet)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"two{ext}").read_bytes() == (tmp_path / f"one{ext}").read_bytes()


@pytest.fixture
def world_worker(monkeypatch):
    monkeypatch.setattr(prep, "_WORKER", {})
    prep._init_worker(world_tokenizer(), prep.RecordOptions(), in_process=True)
    return prep._WORKER["tokenizer"]


def test_byte_table_holds_every_token(world_worker):
    lengths, words, masks = prep._WORKER["byte_table"]
    table = world_worker._id_to_bytes
    assert len(lengths) == world_worker.vocab_size
    for token_id in [0, 1, 11, 256, 257, 24281, *sorted(table, key=lambda i: -len(table[i]))[:3], 65535]:
        token = table.get(token_id)
        if token is None:
            assert lengths[token_id] == -1
            continue
        row = b"".join(int(w[token_id]).to_bytes(8, "little") for w in words)
        valid = b"".join(int(m[token_id]).to_bytes(8, "little") for m in masks)
        assert lengths[token_id] == len(token) and row.rstrip(b"\0") == token.rstrip(b"\0")
        assert valid == b"\xff" * len(token) + b"\0" * (len(valid) - len(token))


def test_round_trip_check_accepts_exact_tokens_and_catches_any_wrong_one(world_worker):
    texts = ["Hello, world!", " " * 200 + "x = 1\n" + "\t" * 30, "你好，世界。" * 5, "=" * 100 + "\n" * 40]
    seg_ids = [world_worker.encode(t) for t in texts]
    flat = np.array([i for ids in seg_ids for i in ids], dtype=np.uint16)
    seg_ends = np.cumsum([len(ids) for ids in seg_ids])
    utf8 = [t.encode("utf-8") for t in texts]
    assert max(map(len, (world_worker._id_to_bytes[i] for i in flat.tolist()))) > 16  # long tokens are checked too
    assert prep._round_trip_matches(flat, seg_ends, utf8)
    lengths = prep._WORKER["byte_table"][0]
    n_checked = 0
    for k in range(len(flat)):  # each token swapped for another of the same length, so only the bytes differ
        others = np.flatnonzero(lengths == lengths[flat[k]])
        others = others[others != flat[k]]
        if len(others):
            bad = flat.copy()
            bad[k] = others[0]
            assert not prep._round_trip_matches(bad, seg_ends, utf8), k
            n_checked += 1
    assert n_checked >= len(flat) - 2


FORK_AFTER_NATIVE_THREADS = """
import sys
from rwkvkit.data.binidx import BinIdxDataset
from rwkvkit.data.prepare import prepare
from rwkvkit.tokenizer import get_tokenizer

tok = get_tokenizer("world")
text = open(sys.argv[1], encoding="utf-8").read()
expected = tok.encode_batch([text])[0] + [0]  # this starts the native engine's thread pool in this process
prepare([sys.argv[1]], sys.argv[2], workers=2, progress=False, log=lambda *a: None)
assert BinIdxDataset(sys.argv[2]).tokens.tolist() == expected
"""


def test_forked_worker_never_touches_the_parents_native_thread_pool(tmp_path):
    """A forked copy of a started native thread pool has no threads: a worker that used it would hang forever."""
    world_tokenizer()
    (tmp_path / "long.txt").write_text("def f(x):\n    return x  # long enough to be encoded in pieces\n" * 40000)
    env = {**os.environ, "RAYON_NUM_THREADS": "4"}  # as a user may have set it: the workers must still not use it
    subprocess.run([sys.executable, "-c", FORK_AFTER_NATIVE_THREADS, str(tmp_path / "long.txt"), str(tmp_path / "d")],
                   check=True, timeout=120, env=env)
