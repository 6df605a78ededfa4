"""The Triton WKV6 kernels against the naive recurrence: values, final state and every gradient (u included).

Without a GPU the same kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1) at tiny shapes.
"""

from __future__ import annotations


import pytest
import torch
from triton_interpreter import (
    assert_kernel_matches, check_bf16_saved_states, count_chunks_on, device_for_kernel_tests,
    fill_new_buffers_with_nan,
)

DEVICE = device_for_kernel_tests("rwkvkit.ops.wkv7.triton_chunk", "rwkvkit.ops.wkv6.triton_chunk")
ON_GPU = DEVICE == "cuda"

from rwkvkit.ops.testing import PACKED_LENGTHS  # noqa: E402
from rwkvkit.ops.varlen import cu_seqlens_of  # noqa: E402
from rwkvkit.ops.wkv6 import triton_chunk, wkv6  # noqa: E402
from rwkvkit.ops.wkv6.naive import wkv6_naive  # noqa: E402
from rwkvkit.ops.wkv7.triton_chunk import KernelConfig  # noqa: E402

HEAD = 64 if ON_GPU else 16
# float32 products everywhere, so the kernels must match the naive loop to float32 rounding
EXACT = KernelConfig(precision_state="ieee", precision_chunk="ieee", precision_solve="ieee", block_v=16)
NAMES = ["y", "final_state", "dr", "dw", "dk", "dv", "du", "d_initial_state"]


def rwkv6_like_inputs(B, T, H, N, seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -torch.exp(randn(B, T, H, N) * 0.5 - 1.0)  # RWKV-6: w = -exp(time_decay + lora)
    u = randn(H, N) * 0.5
    state = randn(B, H, N, N) * 0.5
    return [x.to(DEVICE) for x in (r, w, k, v, u)], state.to(DEVICE)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def run(fn, inputs, state, dy, ds):
    leaves = [x.clone().requires_grad_() for x in inputs]
    s0 = None if state is None else state.clone().requires_grad_()
    y, s_final = fn(*leaves, s0)
    torch.autograd.backward((y, s_final), (dy, ds))
    return [y, s_final] + [x.grad for x in leaves] + ([] if s0 is None else [s0.grad])


@pytest.mark.parametrize(
    "T, with_state, chunk, grad_chunk, halves",
    # walks of 32 or 64 tokens with a gradient kernel of 16 (states at the sub-chunk starts), or 32 throughout
    [(37, True, 16, 16, False), (16, False, 16, 16, False), (5, True, 16, 16, False), (45, True, 32, 16, False),
     (70, False, 64, 16, False), (45, True, 32, 32, False),
     # pair factors split per half chunk (DEFAULT_CONFIG's), also with 32-token walks and 16-token gradients
     (37, True, 16, 16, True), (45, False, 32, 16, True), (70, True, 32, 32, True)],
)
def test_matches_naive_float32(T, with_state, chunk, grad_chunk, halves, monkeypatch):
    inputs, state = rwkv6_like_inputs(2, T, 2, HEAD, seed=T)
    state = state if with_state else None
    dy = torch.randn(2, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(2, 2, HEAD, HEAD, device=DEVICE)
    cfg = EXACT._replace(chunk=chunk, grad_chunk=grad_chunk, pair_halves=halves)
    # 64-token walks floor the log decay at -2.2 (log_decay_floor), which a few of these draws pass (GPU, N = 64)
    floor = triton_chunk.log_decay_floor(cfg)
    got = assert_kernel_matches(lambda r, w, *x: wkv6_naive(r, w.clamp(min=floor), *x),
                                lambda *x: triton_chunk.wkv6_triton(*x, config=cfg), (inputs, state, dy, ds), NAMES,
                                monkeypatch)
    assert len(got) == (8 if with_state else 7)


@pytest.mark.parametrize("chunk, grad_chunk, halves, with_state, cu_on", [
    (16, 16, True, True, "host"), (32, 16, False, False, "device"), (32, 32, False, True, "host"),
    (16, 16, True, False, "device")])
def test_packed_sequences_match_each_sequence_alone(chunk, grad_chunk, halves, with_state, cu_on, monkeypatch):
    """cu_seqlens: as for WKV7, packed sequences of odd lengths (one empty, one of a single token) against the naive
    loop on each alone, into NaN-filled buffers; the bonus u's gradient sums over the sequences."""
    lengths = PACKED_LENGTHS
    T, n = sum(lengths), len(lengths)
    inputs, _ = rwkv6_like_inputs(1, T, 2, HEAD, seed=16)
    state = torch.randn(n, 2, HEAD, HEAD, device=DEVICE) * 0.5 if with_state else None
    dy = torch.randn(1, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(n, 2, HEAD, HEAD, device=DEVICE)
    cu = count_chunks_on(cu_on, cu_seqlens_of(lengths).to(DEVICE), monkeypatch)
    cfg = EXACT._replace(chunk=chunk, grad_chunk=grad_chunk, pair_halves=halves)
    got = assert_kernel_matches(lambda *x: wkv6(*x, impl="naive", cu_seqlens=cu),
                                lambda *x: triton_chunk.wkv6_triton(*x, config=cfg, cu_seqlens=cu),
                                (inputs, state, dy, ds), NAMES, monkeypatch)
    assert len(got) == (8 if with_state else 7)


@pytest.mark.parametrize("chunk, halves", [(16, True), (32, False), (16, False)])
def test_log_decays_below_the_floor_are_floored_not_overflowed(chunk, halves, monkeypatch):
    """RWKV-6's w = -exp(time_decay + lora) is unbounded below (here down to about -1e5): the split pair factors
    would overflow, so the kernels floor w at log_decay_floor (DEFAULT_CONFIG's: -14.4): the floored recurrence
    exactly, and with DEFAULT_CONFIG's split within float32 rounding of the true one (-8 without it: 1e-3)."""
    T = 37
    inputs, state = rwkv6_like_inputs(2, T, 2, HEAD, seed=11)
    inputs[1] = -torch.exp(torch.randn(inputs[1].shape, generator=torch.Generator().manual_seed(3)) * 5).to(DEVICE)
    cfg = EXACT._replace(chunk=chunk, grad_chunk=16, pair_halves=halves)
    floor = triton_chunk.log_decay_floor(cfg)
    assert floor == {(16, True): -14.4, (32, False): -72 / 17, (16, False): -8.0}[chunk, halves]
    assert (inputs[1] < floor).float().mean() > 0.2
    dy = torch.randn(2, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(2, 2, HEAD, HEAD, device=DEVICE)
    fill_new_buffers_with_nan(monkeypatch)
    got = run(lambda *x: triton_chunk.wkv6_triton(*x, config=cfg), inputs, state, dy, ds)
    monkeypatch.undo()
    floored = run(lambda r, w, *x: wkv6_naive(r, w.clamp(min=floor), *x), inputs, state, dy, ds)
    true = run(wkv6_naive, inputs, state, dy, ds)
    for name, g, f, t in zip(NAMES, got, floored, true):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, f) < 2e-5, name
        if chunk == 16:
            assert rel_err(g, t) < (2e-5 if halves else 1e-3), name


def test_default_config_bf16():
    """bf16 in, bf16 out, float32 state; the default (tf32-rounded tensor-core products) is close to the loop."""
    inputs, state = rwkv6_like_inputs(1, 29, 2, HEAD, seed=5)
    inputs = [x.bfloat16() for x in inputs[:4]] + [inputs[4]]
    with torch.no_grad():
        y, s_final = triton_chunk.wkv6_triton(*inputs, state)
    assert y.dtype == torch.bfloat16 and s_final.dtype == torch.float32
    y_ref, s_ref = wkv6_naive(*inputs, state)
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(s_final, s_ref) < 2e-3



def test_half_inputs_save_bf16_states_and_stay_near_the_bf16_floor(monkeypatch):
    """As for WKV7: with 16-bit inputs and gradients the saved per-chunk states and state gradients are bf16, and
    every output and gradient stays near the bf16 rounding of the float64 loop, and near float32 saved states."""
    T = 45
    inputs, state = rwkv6_like_inputs(1, T, 2, HEAD, seed=12)
    inputs = [x.bfloat16() for x in inputs[:4]] + [inputs[4]]
    dy = torch.randn(1, T, 2, HEAD, device=DEVICE).bfloat16()
    ds = torch.randn(1, 2, HEAD, HEAD, device=DEVICE)
    want = run(wkv6_naive, [x.double() for x in inputs], state.double(), dy.double(), ds.double())

    def run_with(cfg):
        return run(lambda *x: triton_chunk.wkv6_triton(*x, config=cfg), inputs, state, dy, ds)

    check_bf16_saved_states(monkeypatch, triton_chunk, run_with, triton_chunk.DEFAULT_CONFIG, want, NAMES)


def test_default_config_gradients_float32_within_tf32_rounding():
    """The default config's gradient kernel (operands rounded to tf32 once each) against the naive loop."""
    T = 29
    inputs, state = rwkv6_like_inputs(1, T, 2, HEAD, seed=7)
    dy = torch.randn(1, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(1, 2, HEAD, HEAD, device=DEVICE)
    got = run(triton_chunk.wkv6_triton, inputs, state, dy, ds)
    want = run(wkv6_naive, inputs, state, dy, ds)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 3e-3, name


def test_default_takes_the_fastest_config_whose_floor_changes_nothing(monkeypatch):
    """With or without gradients: 32-token chunks while every log decay is above their floor (-4.2), 16-token
    chunks above -8, else 16 with the pair factors split per half chunk (floor -14.4); all close to the loop."""
    seen = []
    forward = triton_chunk._forward
    monkeypatch.setattr(triton_chunk, "_forward", lambda *args, **kw: seen.append(args[-1]) or forward(*args, **kw))
    T = 45
    inputs, state = rwkv6_like_inputs(1, T, 2, HEAD, seed=8)
    dy = torch.randn(1, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(1, 2, HEAD, HEAD, device=DEVICE)
    for strong, config in ((None, triton_chunk.LONG_CHUNK_CONFIG), (-7.0, triton_chunk.SHORT_CHUNK_CONFIG),
                           (-12.0, triton_chunk.DEFAULT_CONFIG)):
        if strong is not None:
            inputs[1][..., 0] = strong
        with torch.no_grad():
            y, s_final = triton_chunk.wkv6_triton(*inputs, state)
        y_ref, s_ref = wkv6_naive(*inputs, state)
        assert rel_err(y, y_ref) < 3e-3 and rel_err(s_final, s_ref) < 3e-3
        got = run(triton_chunk.wkv6_triton, inputs, state, dy, ds)
        want = run(wkv6_naive, inputs, state, dy, ds)
        for name, g, w in zip(NAMES, got, want):
            assert rel_err(g, w) < 3e-3, name
        assert seen[-2:] == [config, config]


def test_no_decay_check_where_the_gpu_must_not_be_waited_for(monkeypatch):
    """Inside ops.without_device_syncs (a CUDA graph's warm-up and recording) the default is DEFAULT_CONFIG, whatever
    the decays: the check would wait for the GPU."""
    from rwkvkit.ops import without_device_syncs

    seen = []
    forward = triton_chunk._forward
    monkeypatch.setattr(triton_chunk, "_forward", lambda *args, **kw: seen.append(args[-1]) or forward(*args, **kw))
    inputs, state = rwkv6_like_inputs(1, 20, 2, HEAD, seed=9)
    with torch.no_grad():
        triton_chunk.wkv6_triton(*inputs, state)
        with without_device_syncs():
            triton_chunk.wkv6_triton(*inputs, state)
        triton_chunk.wkv6_triton(*inputs, state)
    assert seen == [triton_chunk.LONG_CHUNK_CONFIG, triton_chunk.DEFAULT_CONFIG, triton_chunk.LONG_CHUNK_CONFIG]


def test_fp16_operands_are_a_wkv7_option():
    """The WKV6 kernels neither scale their gradients nor bound their pair factors for fp16: such a config is named."""
    from rwkvkit.errors import ConfigError

    inputs, state = rwkv6_like_inputs(1, 20, 2, HEAD, seed=9)
    with pytest.raises(ConfigError, match="'fp16' is a WKV7 option"):
        triton_chunk.wkv6_triton(*inputs, state, config=triton_chunk.KernelConfig(precision_chunk="fp16"))
