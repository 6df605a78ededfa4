import json

import numpy as np
import pytest
from data_helpers import ByteTokenizer

from rwkvkit.data import Batcher, DocumentWindows, TokenWindows
from rwkvkit.data.binidx import BinIdxWriter
from rwkvkit.data.dataset import IGNORE_INDEX
from rwkvkit.data.prepare import prepare
from rwkvkit.data.sampler import SAMPLES_PER_EPOCH
from rwkvkit.errors import ConfigError, DataError


@pytest.fixture
def stream(tmp_path):
    """A flat stream of 1001 tokens: token k has value k % 50000 + 1, so windows are easy to recognise."""
    w = BinIdxWriter(tmp_path / "s.bin", np.uint16)
    w.add_item(np.arange(1001) % 50000 + 1)
    w.end_document()
    w.finish(tmp_path / "s.idx")
    return tmp_path / "s"


def test_token_windows_read_the_sampler_windows(stream):
    src = TokenWindows(stream, ctx_len=8, micro_bsz=2, world_size=2)
    assert src.sampler.magic_prime == 113  # 1001 // 8 - 1 = 124; 122, 119 and 116 are not prime
    b = src.batch(5, rank=1)
    assert b.input_ids.shape == (2, 8) and b.input_ids.dtype == np.int64 and b.loss_mask is None
    for j in range(2):
        start = src.sampler.window_start(5, j, 1)
        assert b.input_ids[j].tolist() == list(range(start + 1, start + 9))
        assert b.targets[j].tolist() == list(range(start + 2, start + 10))
        x, y = src.sample_window(5, j, 1)
        assert (x == b.input_ids[j]).all() and (y == b.targets[j]).all()


def test_an_epoch_of_windows_over_all_ranks_covers_distinct_chunks(tmp_path):
    # a stream with more chunk slots than one mini-epoch has samples: no window may repeat within it
    n = (SAMPLES_PER_EPOCH + 100) * 4 + 1
    w = BinIdxWriter(tmp_path / "e.bin", np.uint16)
    w.add_item(np.zeros(n, np.uint16))
    w.end_document()
    w.finish(tmp_path / "e.idx")
    src = TokenWindows(tmp_path / "e", ctx_len=4, micro_bsz=4, world_size=2)
    starts = [s for step in range(src.steps_per_epoch) for r in range(2) for s in src.sampler.batch_starts(step, r)]
    assert len(starts) == SAMPLES_PER_EPOCH == len(set(starts))


def test_batcher_resumes_from_a_saved_position(stream):
    src = TokenWindows(stream, ctx_len=8, micro_bsz=2)
    run = Batcher(src)
    first = [next(run) for _ in range(5)]
    saved = run.state_dict()
    rest = [next(run) for _ in range(3)]
    again = Batcher(TokenWindows(stream, ctx_len=8, micro_bsz=2))
    again.load_state_dict(json.loads(json.dumps(saved)))  # survives a JSON checkpoint
    assert saved["micro_step"] == 5 and first[0].input_ids.tolist() != first[1].input_ids.tolist()
    for a, b in zip(rest, (next(again) for _ in range(3))):
        assert (a.input_ids == b.input_ids).all()
    other = Batcher(TokenWindows(stream, ctx_len=8, micro_bsz=4))
    with pytest.raises(ConfigError, match="micro_bsz: 2 -> 4"):
        other.load_state_dict(saved)


def test_rank_outside_world_is_refused(stream):
    with pytest.raises(ConfigError, match="rank 2"):
        TokenWindows(stream, ctx_len=8, world_size=2).batch(0, rank=2)


@pytest.fixture
def chat_data(tmp_path):
    records = [
        {"prompt": "hi", "response": "yo"},
        {"text": "x" * 25},  # long: 26 tokens with its end token -> 25 targets -> 4 rows at ctx_len 8
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare([tmp_path / "c.jsonl"], tmp_path / "c", tokenizer=ByteTokenizer(), shuffle=False, workers=1,
            progress=False, log=lambda *a: None)
    return tmp_path / "c"


def test_document_rows_pad_and_mask(chat_data):
    src = DocumentWindows(chat_data, ctx_len=8, shuffle=False)
    assert src.mask is not None and src.num_rows == 3 + 4 + 3
    dec = ByteTokenizer().decode
    # row 0 .. 2: "User: hi\n\nAssistant: yo" + end token, in 8-token pieces
    pieces = [src.sample_window(k) for k in range(3)]
    trained = [t for x, y, m in pieces for t, keep in zip(y, m) if keep]
    assert dec(trained[:-1]) == " yo" and trained[-1] == 0
    x, y, m = src.sample_window(2)  # the last piece of that document is padded with 0 and masked out
    doc_len = len("User: hi\n\nAssistant: yo") + 1
    n_targets = doc_len - 1 - 2 * 8
    assert m[n_targets:].sum() == 0 and (y[n_targets:] == 0).all() and (x[n_targets + 1 :] == 0).all()
    # the long plain document is trained everywhere it has real targets
    rows = [src.sample_window(k) for k in range(3, 7)]
    assert [int(m.sum()) for _, _, m in rows] == [8, 8, 8, 1]
    b = src.batch(0)
    assert b.loss_mask.dtype == np.float32
    assert (b.masked_targets()[b.loss_mask == 0] == IGNORE_INDEX).all()


def test_document_order_is_a_seeded_permutation_per_epoch(chat_data):
    src = DocumentWindows(chat_data, ctx_len=8, micro_bsz=1, world_size=2, seed=3)
    assert src.steps_per_epoch == 5
    epoch0 = [src.row(s, 0, r) for s in range(5) for r in range(2)]
    epoch1 = [src.row(s, 0, r) for s in range(5, 10) for r in range(2)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    same = DocumentWindows(chat_data, ctx_len=8, micro_bsz=1, world_size=2, seed=3)
    assert [same.row(s, 0, r) for s in range(5) for r in range(2)] == epoch0


def test_too_few_rows_for_the_batch(chat_data):
    with pytest.raises(DataError, match="fewer than micro_bsz"):
        DocumentWindows(chat_data, ctx_len=64, micro_bsz=4)


def test_batch_to_torch(stream):
    torch = pytest.importorskip("torch")
    x, y, m = TokenWindows(stream, ctx_len=8).batch(0).to_torch()
    assert x.dtype == torch.int64 and x.shape == (1, 8) and m is None


def test_document_cu_seqlens_start_a_sequence_at_each_row_and_after_each_end_token():
    from rwkvkit.data.dataset import Batch

    ids = np.array([[5, 0, 7, 8], [0, 3, 0, 0]])  # a row's last token starts nothing inside the batch
    cu = Batch(ids, ids).document_cu_seqlens()
    assert cu.dtype == np.int32 and cu.tolist() == [0, 2, 4, 5, 7, 8]
    assert Batch(np.ones((2, 3), np.int64), np.ones((2, 3), np.int64)).document_cu_seqlens().tolist() == [0, 3, 6]
