"""The Triton WKV4 chunk scan against the naive recurrence: values, final state and every gradient.

Without a GPU the same kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1) at tiny shapes.
"""

from __future__ import annotations


import pytest
import torch
from triton_interpreter import device_for_kernel_tests, fill_new_buffers_with_nan

DEVICE = device_for_kernel_tests("rwkvkit.ops.wkv4.triton_chunk")

from rwkvkit.ops.testing import rel_rms, run_with_grads, wkv4_inputs  # noqa: E402
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
