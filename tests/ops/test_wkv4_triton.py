"""The Triton WKV4 chunk scan against the naive recurrence: values, final state and every gradient.

Without a GPU the same kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1) at tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import (assert_kernel_matches, compiled_blocks_match_eager, compiles_here, count_chunks_on,
                                device_for_kernel_tests, fill_new_buffers_with_nan)

DEVICE = device_for_kernel_tests("rwkvkit.ops.wkv4.triton_chunk")

from rwkvkit.ops.testing import PACKED_LENGTHS, rel_rms, run_with_grads, wkv4_inputs  # noqa: E402
from rwkvkit.ops.varlen import cu_seqlens_of  # noqa: E402
from rwkvkit.ops.wkv4 import triton_chunk, wkv4  # noqa: E402
from rwkvkit.ops.wkv4.naive import wkv4_naive  # noqa: E402

NAMES = ["y", "final_state", "dw", "du", "dk", "dv", "d_initial_state"]


def to_device(inputs, state):
    return [x.to(DEVICE) for x in inputs], state.to(DEVICE)


@pytest.mark.parametrize("chunk", [64, 4])
@pytest.mark.parametrize("T, C, with_state, k_scale", [(13, 130, True, 1.0), (1, 40, False, 1.0),
                                                       (29, 64, False, 6.0), (7, 200, True, 6.0)])
def test_matches_naive_float32(T, C, with_state, k_scale, chunk, monkeypatch):
    """k_scale 6 makes the running max switch sides often (large keys), exercising the pp gradient routing. Chunks
    of 4 tokens: several chunks, a short last one, and the carry passes between them."""
    monkeypatch.setattr(triton_chunk, "CHUNK", chunk)
    inputs, state = to_device(*wkv4_inputs(2, T, C, seed=T, k_scale=k_scale))
    state = state if with_state else None
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(2, T, C, generator=g).to(DEVICE)
    ds = torch.randn(2, 3, C, generator=g).to(DEVICE)
    want = run_with_grads(wkv4_naive, inputs, state, dy, ds)
    with monkeypatch.context() as m:
        fill_new_buffers_with_nan(m)
        got = run_with_grads(triton_chunk.wkv4_triton, inputs, state, dy, ds)
    assert len(got) == len(want)
    for name, x, ref in zip(NAMES, got, want):
        assert torch.isfinite(x).all(), name
        assert rel_rms(x, ref) < 2e-5, name


def test_half_inputs_and_no_grad_path():
    inputs, state = to_device(*wkv4_inputs(1, 17, 48, seed=3))
    w, u, k, v = inputs
    with torch.no_grad():
        y, s = triton_chunk.wkv4_triton(w, u, k.bfloat16(), v.bfloat16(), state)
        y_ref, s_ref = wkv4_naive(w, u, k.bfloat16(), v.bfloat16(), state)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_rms(y, y_ref) < 1e-2 and rel_rms(s, s_ref) < 1e-5


@pytest.mark.parametrize("chunk", [64, 8])
def test_state_chains_across_calls_and_dispatch(chunk, monkeypatch):
    monkeypatch.setattr(triton_chunk, "CHUNK", chunk)
    inputs, _ = to_device(*wkv4_inputs(1, 30, 32, seed=4))
    w, u, k, v = inputs
    with torch.no_grad():
        y_all, s_all = wkv4(w, u, k, v, impl="triton")
        y1, s1 = triton_chunk.wkv4_triton(w, u, k[:, :11], v[:, :11])
        y2, s2 = triton_chunk.wkv4_triton(w, u, k[:, 11:], v[:, 11:], s1)
    assert rel_rms(torch.cat([y1, y2], 1), y_all) < 1e-6 and rel_rms(s2, s_all) < 1e-6


@pytest.mark.parametrize("chunk, with_state, cu_on", [(8, True, "host"), (64, False, "host"), (8, False, "device"),
                                                       (4, True, "device")])
def test_packed_sequences_match_each_sequence_alone(chunk, with_state, cu_on, monkeypatch):
    """cu_seqlens: sequences of odd lengths (one empty, one of a single token, one of 16: a whole number of chunks)
    packed in one row, one launch per pass, against the naive recurrence on each sequence alone: outputs, every final
    state and all gradients, into NaN-filled buffers; grids counted exactly ("host") or bounded with spare programs."""
    monkeypatch.setattr(triton_chunk, "CHUNK", chunk)
    lengths = PACKED_LENGTHS
    (w, u, k, v), state = wkv4_inputs(len(lengths), sum(lengths), 130, seed=21, k_scale=6.0)
    k, v = k[:1], v[:1]  # one row of all the sequences' tokens; a state per sequence
    state = state.to(DEVICE) if with_state else None
    g = torch.Generator().manual_seed(22)
    dy = torch.randn(1, sum(lengths), 130, generator=g).to(DEVICE)
    ds = torch.randn(len(lengths), 3, 130, generator=g).to(DEVICE)
    with monkeypatch.context() as m:
        cu = count_chunks_on(cu_on, cu_seqlens_of(lengths).to(DEVICE), m)
        got = assert_kernel_matches(lambda *x: wkv4(*x, impl="naive", cu_seqlens=cu),
                                    lambda *x: triton_chunk.wkv4_triton(*x, cu_seqlens=cu),
                                    ([x.to(DEVICE) for x in (w, u, k, v)], state, dy, ds), NAMES, m)
    assert len(got) == (7 if with_state else 6)


@compiles_here
def test_model_compiles_without_graph_breaks_and_keeps_gradients(monkeypatch):
    """The kernel is a registered op under torch.compile, so each compiled v4 block has no graph break around it,
    and the compiled loss and gradients equal eager ones."""
    import functools

    import rwkvkit.models.v4 as v4
    from rwkvkit.models import RWKVConfig, build_model

    monkeypatch.setattr(v4, "wkv4", functools.partial(wkv4, impl="triton"))
    torch.manual_seed(0)
    model = build_model(RWKVConfig("4", 3, 64, 100), init=True).to(DEVICE)
    idx = torch.randint(0, 100, (2, 21), device=DEVICE)
    assert compiled_blocks_match_eager(model, idx, monkeypatch) == 2  # one time-mix graph, one channel-mix graph


@pytest.mark.parametrize("packed", [False, True])
def test_registered_op_matches_and_passes_opcheck(packed, monkeypatch):
    """The op form torch.compile uses (the eager calls above take the autograd.Function): the same outputs and
    gradients, initial state included, and torch.library.opcheck's checks of its fake shapes and autograd."""
    monkeypatch.setattr(triton_chunk, "CHUNK", 4)
    lengths = (5, 0, 8) if packed else (13,)
    (w, u, k, v), state = wkv4_inputs(len(lengths), 13, 40, seed=23)
    state = state.to(DEVICE)
    if packed:
        k, v = k[:1, : sum(lengths)], v[:1, : sum(lengths)]
    cu = cu_seqlens_of(lengths).to(DEVICE) if packed else None
    inputs = [x.to(DEVICE) for x in (w, u, k, v)]
    g = torch.Generator().manual_seed(24)
    dy, ds = torch.randn(k.shape, generator=g).to(DEVICE), torch.randn(state.shape, generator=g).to(DEVICE)

    def op(w, u, k, v, s0):
        y, s_final, _ = triton_chunk._wkv4_fwd_op(w, u, k, v, s0, cu)
        return y, s_final

    assert_kernel_matches(lambda *x: triton_chunk.wkv4_triton(*x, cu_seqlens=cu), op, (inputs, state, dy, ds),
                          NAMES, monkeypatch, tol=1e-6)
    torch.library.opcheck(triton_chunk._wkv4_fwd_op, (*inputs, state, cu),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_bad_cu_seqlens_are_named(impl):
    """WKV4 checks cu_seqlens with the check WKV6/WKV7 use (tests/ops/test_wkv_cpu.py tries its every case there),
    on the kernel path before any launch and on the per-sequence PyTorch path."""
    from rwkvkit.errors import ConfigError

    (w, u, k, v), state = to_device(*wkv4_inputs(1, 10, 40, seed=25))
    with pytest.raises(ConfigError, match="T_total = 10"):
        wkv4(w, u, k, v, impl=impl, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ConfigError, match="one state per sequence"):
        wkv4(w, u, k, v, state, impl=impl, cu_seqlens=torch.tensor([0, 4, 10]))
