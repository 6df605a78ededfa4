"""The "auto" dispatch rules and the kernels' launch-size rules (pure functions: no GPU needed)."""

from types import SimpleNamespace

import pytest
import torch

import rwkvkit.ops.wkv4 as wkv4_module
import rwkvkit.ops.wkv6 as wkv6_module
import rwkvkit.ops.wkv7 as wkv7_module
from rwkvkit.ops import KERNEL_MIN_T, walk_block_v, wants_kernel


def _seq(T, cuda=True):
    return SimpleNamespace(is_cuda=cuda, shape=(2, T, 4, 16))


def test_kernels_only_for_cuda_sequences_from_the_minimum_length():
    assert wants_kernel(_seq(KERNEL_MIN_T))
    assert wants_kernel(_seq(4096))
    assert not wants_kernel(_seq(KERNEL_MIN_T - 1))  # a short prompt: no first-call Triton compile
    assert not wants_kernel(_seq(1))
    assert not wants_kernel(_seq(4096, cuda=False))


@pytest.mark.parametrize(
    "module, args",
    [
        (wkv7_module, lambda x: (x, -x.abs(), x, x, x, x)),
        (wkv6_module, lambda x: (x, -x.abs(), x, x, torch.zeros(x.shape[2], x.shape[3]))),
        (wkv4_module, lambda x: (-torch.ones(x.shape[2]), torch.zeros(x.shape[2]), x, x)),
    ],
    ids=["wkv7", "wkv6", "wkv4"],
)
def test_auto_dispatch_calls_the_kernel_when_wanted(monkeypatch, module, args):
    calls = []

    def fake_kernel(*a, **kw):  # (wkv7 also hands on the caller's log_decay_min)
        calls.append(a)
        return "kernel result"

    monkeypatch.setattr(module, "triton_kernel", lambda *key: fake_kernel)
    x = torch.randn(1, 3, 2, 4) if module is not wkv4_module else torch.randn(1, 3, 2)
    op = getattr(module, module.__name__.rsplit(".", 1)[1])
    monkeypatch.setattr(module, "wants_kernel", lambda t: True)
    assert op(*args(x)) == "kernel result" and len(calls) == 1
    monkeypatch.setattr(module, "wants_kernel", lambda t: False)
    y, state = op(*args(x))  # the PyTorch path
    assert y.shape == x.shape and len(calls) == 1


def test_walk_blocks_shrink_when_batch_times_heads_is_small():
    assert walk_block_v(8 * 12, 64, None) == 32  # training batch at 0.1B
    assert walk_block_v(4 * 32, 64, None) == 32
    assert walk_block_v(1 * 12, 64, None) == 16  # batch-1 prefill: twice the programs
    assert walk_block_v(1 * 12, 64, 64) == 64  # an explicit choice wins
    assert walk_block_v(96, 16, None) == 16  # never wider than the head
    assert walk_block_v(1 * 32, 64, None) == 16  # 1.5B batch-1 prefill


def test_wkv4_chunk_passes_give_many_programs():
    pytest.importorskip("triton")
    import torch

    from rwkvkit.ops.wkv4.triton_chunk import BLOCK, CHUNK, _layout

    lay = _layout(torch.empty(8, 4096, 768), None)  # v4 0.1B training batch
    assert lay.n_chunks == 4096 // CHUNK and lay.chunk_grid == (lay.n_chunks, 8, 768 // BLOCK)
    assert lay.carry_grid == (8, 24)
    warps = lay.chunk_grid[0] * lay.chunk_grid[1] * lay.chunk_grid[2] * BLOCK // 32
    assert warps >= 16 * lay.carry_grid[0] * lay.carry_grid[1]  # >= 16x the warps of a walk over all T
    lay = _layout(torch.empty(1, 5, 100), None)  # shorter than a chunk: one chunk, one partial block
    assert lay.n_chunks == 1 and lay.chunk_grid == (1, 1, 1)
