import struct

import numpy as np
import pytest

from rwkvkit.data.binidx import BinIdxDataset, BinIdxWriter, token_dtype, write_index
from rwkvkit.errors import DataError


def test_index_bytes_match_a_hand_built_header(tmp_path):
    write_index(tmp_path / "a.idx", np.uint16, np.array([3, 2]), np.array([0, 1, 2]))
    expected = (
        b"MMIDIDX\x00\x00"
        + (1).to_bytes(8, "little")  # version
        + bytes([8])  # dtype code 8 = uint16
        + (2).to_bytes(8, "little")  # items
        + (3).to_bytes(8, "little")  # doc_idx entries
        + struct.pack("<2i", 3, 2)  # sizes
        + struct.pack("<2q", 0, 6)  # byte pointers: 3 tokens * 2 bytes
        + struct.pack("<3q", 0, 1, 2)  # doc_idx
    )
    assert (tmp_path / "a.idx").read_bytes() == expected


def test_reader_opens_a_hand_built_rwkv_lm_style_pair(tmp_path):
    tokens = np.array([5, 6, 0, 7, 0], dtype=np.uint16)
    (tmp_path / "d.bin").write_bytes(tokens.tobytes())
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 3)
    body = struct.pack("<2i", 3, 2) + struct.pack("<2q", 0, 6) + struct.pack("<3q", 0, 1, 2)
    (tmp_path / "d.idx").write_bytes(header + body)
    ds = BinIdxDataset(tmp_path / "d")
    assert ds.dtype == np.uint16 and len(ds) == 2 and ds.num_tokens == 5 and ds.num_documents == 2
    assert ds[0].tolist() == [5, 6, 0] and ds[1].tolist() == [7, 0]
    assert ds.get(2, 3).tolist() == [0, 7, 0]  # the flat stream crosses documents, as in RWKV-LM
    assert BinIdxDataset(tmp_path / "d.bin").num_tokens == 5  # a path with extension names the pair too


def test_writer_round_trip_with_multi_item_documents_and_discard(tmp_path):
    w = BinIdxWriter(tmp_path / "x.bin", np.uint16)
    w.add_item([1, 2, 0])
    w.end_document()
    w.add_item([9, 9])  # a document found bad after its first piece
    w.discard_document()
    w.add_item([3, 4])
    w.add_item([5, 0])
    w.end_document()
    w.finish(tmp_path / "x.idx")
    ds = BinIdxDataset(tmp_path / "x")
    assert ds.tokens.tolist() == [1, 2, 0, 3, 4, 5, 0]
    assert ds.sizes.tolist() == [3, 2, 2] and ds.doc_idx.tolist() == [0, 1, 3]
    assert ds.document(1).tolist() == [3, 4, 5, 0]
    starts, ends = ds.document_spans()
    assert starts.tolist() == [0, 3] and ends.tolist() == [3, 7]


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(50277) == np.uint16
    assert token_dtype(65537) == np.int32
    w = BinIdxWriter(tmp_path / "big.bin", token_dtype(100_000))
    w.add_item([99_999, 0])
    w.end_document()
    w.finish(tmp_path / "big.idx")
    assert (tmp_path / "big.idx").read_bytes()[17] == 4  # int32
    assert BinIdxDataset(tmp_path / "big")[0].tolist() == [99_999, 0]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"NOTIDX\x00\x00\x00" + b[9:], "not a binidx index"),
        (lambda b: b[:9] + (2).to_bytes(8, "little") + b[17:], "version 2"),
        (lambda b: b[:-4], "truncated"),
    ],
)
def test_reader_rejects_damaged_index(tmp_path, damage, message):
    (tmp_path / "d.bin").write_bytes(np.array([1, 0], np.uint16).tobytes())
    write_index(tmp_path / "d.idx", np.uint16, np.array([2]), np.array([0, 1]))
    (tmp_path / "d.idx").write_bytes(damage((tmp_path / "d.idx").read_bytes()))
    with pytest.raises(DataError, match=message):
        BinIdxDataset(tmp_path / "d")


def test_missing_files_are_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        BinIdxDataset(tmp_path / "nothing")
