"""The Triton WKV6 kernels against the naive recurrence: values, final state and every gradient (u included).

Without a GPU the same kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1) at tiny shapes.
"""

from __future__ import annotations


import pytest
import torch
from triton_interpreter import (
    assert_kernel_matches, check_bf16_saved_states, count_chunks_on, device_for_kernel_tests,
    fill_new_buffers_with_nan, spy_on_walk_grids,
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


def rwkv6_like_inputs(B, T, H, N, seed, steep=()):
    """steep: log decays per batch row (cycled) for the middle third of the tokens, about -6 or -12 per token, so
    that the chunks that hold enough of them are too steep for the pair factors' split around the middle token (the
    others are not): with -6 one level of halves fits 32-token chunks, with -12 they need two."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -torch.exp(randn(B, T, H, N) * 0.5 - 1.0)  # RWKV-6: w = -exp(time_decay + lora)
    if steep:
        typical = -torch.tensor(steep).repeat(B)[:B].view(B, 1, 1, 1)
        w[:, T // 3: 2 * T // 3] = typical * torch.exp(randn(B, 2 * T // 3 - T // 3, H, N) * 0.05)
    u = randn(H, N) * 0.5
    state = randn(B, H, N, N) * 0.5
    return [x.to(DEVICE) for x in (r, w, k, v, u)], state.to(DEVICE)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def spy_on_steep_flags(monkeypatch) -> list:
    """The first passes' flags of every chunk-parallel launch, as they are once the call returns."""
    seen = []
    make = triton_chunk._steep_flags
    monkeypatch.setattr(triton_chunk, "_steep_flags", lambda *a: seen.append(make(*a)) or seen[-1])
    return seen


def assert_passes_took_chunks(flags: list) -> None:
    """Each launch's first pass took some chunks and left some to a later one."""
    assert flags and all(0 in f and f.gt(0).any() for f in flags), [f.tolist() for f in flags]


def run(fn, inputs, state, dy, ds):
    leaves = [x.clone().requires_grad_() for x in inputs]
    s0 = None if state is None else state.clone().requires_grad_()
    y, s_final = fn(*leaves, s0)
    torch.autograd.backward((y, s_final), (dy, ds))
    return [y, s_final] + [x.grad for x in leaves] + ([] if s0 is None else [s0.grad])


@pytest.mark.parametrize(
    "T, with_state, chunk, grad_chunk, levels",
    # walks of 32 or 64 tokens with a gradient kernel of 16 (states at the sub-chunk starts), or 32 throughout
    [(37, True, 16, 16, 0), (16, False, 16, 16, 0), (5, True, 16, 16, 0), (45, True, 32, 16, 0),
     (70, False, 64, 16, 0), (45, True, 32, 32, 0),
     # steep chunks split by halves in a second pass (DEFAULT_CONFIG: 32-token chunks, 2 levels), on inputs where
     # some chunks are steep and some not; also with 32-token walks and 16-token gradients
     (70, True, 32, 32, 2), (45, False, 32, 16, 2), (70, True, 32, 32, 1), (37, True, 16, 16, 1),
     (37, False, 16, 16, 2)],
)
def test_matches_naive_float32(T, with_state, chunk, grad_chunk, levels, monkeypatch):
    inputs, state = rwkv6_like_inputs(2, T, 2, HEAD, seed=T, steep=(6.0, 12.0) if levels else ())
    state = state if with_state else None
    dy = torch.randn(2, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(2, 2, HEAD, HEAD, device=DEVICE)
    cfg = EXACT._replace(chunk=chunk, grad_chunk=grad_chunk, pair_levels=levels)
    # 64-token walks floor the log decay at -2.2 (log_decay_floor), which a few of these draws pass (GPU, N = 64)
    floor = triton_chunk.log_decay_floor(cfg)
    flags = spy_on_steep_flags(monkeypatch)
    got = assert_kernel_matches(lambda r, w, *x: wkv6_naive(r, w.clamp(min=floor), *x),
                                lambda *x: triton_chunk.wkv6_triton(*x, config=cfg), (inputs, state, dy, ds), NAMES,
                                monkeypatch)
    assert len(got) == (8 if with_state else 7)
    if levels:  # the forward's; the backward reads them where it takes the same chunks, else flags its own
        assert len(flags) == (1 if grad_chunk == chunk else 2)
        assert_passes_took_chunks(flags)


def test_walks_take_whole_heads_once_the_programs_fill_the_gpu(monkeypatch):
    """With enough sequences x heads (here: the threshold lowered to 1) and no block_v asked for, both walks take
    all 32 value rows of a head in one program; results as exact."""
    from rwkvkit.ops.wkv7 import triton_chunk as shared_layout

    monkeypatch.setattr(shared_layout, "WHOLE_HEAD_WALKS", 1)  # (the rule of the layout WKV6 shares with WKV7)
    grids = spy_on_walk_grids(triton_chunk, monkeypatch)
    inputs, state = rwkv6_like_inputs(1, 37, 2, 32, seed=31)
    dy, ds = torch.randn(1, 37, 2, 32, device=DEVICE), torch.randn(1, 2, 32, 32, device=DEVICE)
    cfg = EXACT._replace(chunk=32, block_v=None)
    assert_kernel_matches(wkv6_naive, lambda *x: triton_chunk.wkv6_triton(*x, config=cfg), (inputs, state, dy, ds),
                          NAMES, monkeypatch)
    assert grids == {"_fwd_state": [(1, 2)], "_bwd_state": [(1, 2)]}


@pytest.mark.parametrize("T, chunk, grad_chunk, levels, with_state, packed", [
    (45, 32, 32, 2, True, False), (37, 16, 16, 0, False, False), (45, 32, 16, 0, True, False),
    (None, 32, 32, 2, True, True)])
def test_time_constant_decay(T, chunk, grad_chunk, levels, with_state, packed, monkeypatch):
    """RWKV-5's decay, one per channel for every token ([H, N]): the same results as that decay given per token, and
    its gradient [H, N] summed over every token (and sequence), into NaN-filled buffers. One channel decays steeply
    enough to make every chunk of its head steep, one more so, one below the floor (no gradient there)."""
    lengths = PACKED_LENGTHS if packed else None
    T = sum(lengths) if packed else T
    inputs, state = rwkv6_like_inputs(1 if packed else 2, T, 2, HEAD, seed=33)
    w = -torch.exp(torch.randn(2, HEAD, generator=torch.Generator().manual_seed(34)) * 0.5 - 1.0)
    w[0, 0], w[1, 1], w[1, 2] = -6.0, -12.0, -20.0
    inputs[1] = w.to(DEVICE)
    cu = cu_seqlens_of(lengths).to(DEVICE) if packed else None
    n = len(lengths) if packed else 2
    state = torch.randn(n, 2, HEAD, HEAD, device=DEVICE) * 0.5 if with_state else None
    dy = torch.randn(inputs[0].shape, device=DEVICE)
    ds = torch.randn(n, 2, HEAD, HEAD, device=DEVICE)
    cfg = EXACT._replace(chunk=chunk, grad_chunk=grad_chunk, pair_levels=levels)
    floor = triton_chunk.log_decay_floor(cfg)
    got = assert_kernel_matches(lambda r, w, *x: wkv6(r, w.clamp(min=floor), *x, impl="naive", cu_seqlens=cu),
                                lambda *x: triton_chunk.wkv6_triton(*x, config=cfg, cu_seqlens=cu),
                                (inputs, state, dy, ds), NAMES, monkeypatch)
    assert got[3].shape == (2, HEAD) and got[3][1, 2] == 0


@pytest.mark.parametrize("chunk, grad_chunk, levels, with_state, cu_on", [
    (32, 32, 2, True, "host"), (32, 16, 0, False, "device"), (32, 32, 0, True, "host"),
    (32, 32, 2, False, "device"), (16, 16, 1, True, "device")])
def test_packed_sequences_match_each_sequence_alone(chunk, grad_chunk, levels, with_state, cu_on, monkeypatch):
    """cu_seqlens: as for WKV7, packed sequences of odd lengths (one empty, one of a single token) against the naive
    loop on each alone, into NaN-filled buffers; the bonus u's gradient sums over the sequences. With pair_levels,
    some chunks steep (floored as the kernels floor them)."""
    lengths = PACKED_LENGTHS
    T, n = sum(lengths), len(lengths)
    inputs, _ = rwkv6_like_inputs(1, T, 2, HEAD, seed=16, steep=(12.0,) if levels else ())
    state = torch.randn(n, 2, HEAD, HEAD, device=DEVICE) * 0.5 if with_state else None
    dy = torch.randn(1, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(n, 2, HEAD, HEAD, device=DEVICE)
    cu = count_chunks_on(cu_on, cu_seqlens_of(lengths).to(DEVICE), monkeypatch)
    cfg = EXACT._replace(chunk=chunk, grad_chunk=grad_chunk, pair_levels=levels)
    floor = triton_chunk.log_decay_floor(cfg)
    flags = spy_on_steep_flags(monkeypatch)
    got = assert_kernel_matches(lambda r, w, *x: wkv6(r, w.clamp(min=floor), *x, impl="naive", cu_seqlens=cu),
                                lambda *x: triton_chunk.wkv6_triton(*x, config=cfg, cu_seqlens=cu),
                                (inputs, state, dy, ds), NAMES, monkeypatch)
    assert len(got) == (8 if with_state else 7)
    if levels:
        assert_passes_took_chunks(flags)


@pytest.mark.parametrize("chunk, levels", [(32, 2), (16, 1), (32, 0), (16, 0)])
def test_log_decays_below_the_floor_are_floored_not_overflowed(chunk, levels, monkeypatch):
    """RWKV-6's w = -exp(time_decay + lora) is unbounded below (here down to about -1e5): the split pair factors
    would overflow, so the kernels floor w at log_decay_floor (DEFAULT_CONFIG's: -14.4): the floored recurrence
    exactly, and at -14.4 within float32 rounding of the true one (at -8: 1e-3)."""
    T = 37
    inputs, state = rwkv6_like_inputs(2, T, 2, HEAD, seed=11)
    inputs[1] = -torch.exp(torch.randn(inputs[1].shape, generator=torch.Generator().manual_seed(3)) * 5).to(DEVICE)
    cfg = EXACT._replace(chunk=chunk, grad_chunk=16, pair_levels=levels)
    floor = triton_chunk.log_decay_floor(cfg)
    assert floor == {(32, 2): -14.4, (16, 1): -14.4, (32, 0): -72 / 17, (16, 0): -8.0}[chunk, levels]
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
        if floor <= -8:
            assert rel_err(g, t) < (2e-5 if floor == -14.4 else 1e-3), name


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


def test_default_config_takes_each_chunk_by_its_own_decays_without_waiting_for_the_gpu(monkeypatch):
    """With or without gradients, DEFAULT_CONFIG for every input and no device sync (so also inside CUDA graphs):
    the chunks too steep for the split around their middle token are left by the first pass to the second;
    tf32-rounded products stay close to the loop on mild inputs, on inputs with some steep chunks (which need one or
    two levels of splits) and on all-steep ones."""
    from rwkvkit.ops import without_device_syncs

    seen = []
    forward = triton_chunk._forward
    monkeypatch.setattr(triton_chunk, "_forward", lambda *args, **kw: seen.append(args[-1]) or forward(*args, **kw))
    flags = spy_on_steep_flags(monkeypatch)
    T = 70
    dy = torch.randn(2, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(2, 2, HEAD, HEAD, device=DEVICE)
    # steep chunks per (batch row x head, chunk): tokens 23-45 at -6 in batch row 0 (chunk 0 holds 9 of them: no
    # split needed; chunk 1 15: one level would do), at -12 in row 1 (two levels); the last chunk (6 tokens) fits
    some = torch.tensor([[0, 1, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.int8)
    for steep, every in (((), False), ((6.0, 12.0), False), ((), True)):
        inputs, state = rwkv6_like_inputs(2, T, 2, HEAD, seed=8, steep=steep)
        if every:  # about -7.4 per token (-exp(N(2, 0.5))), as `benchmarks/gpu_wkv.py --log-decay-mu 2`
            inputs[1] = -torch.exp(torch.randn(inputs[1].shape, generator=torch.Generator().manual_seed(4)) * 0.5
                                   + 2).to(DEVICE)
        with torch.no_grad(), without_device_syncs(), monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", lambda self: pytest.fail("a value read back from the device"))
            y, s_final = triton_chunk.wkv6_triton(*inputs, state)
        y_ref, s_ref = wkv6_naive(*inputs, state)
        assert rel_err(y, y_ref) < 3e-3 and rel_err(s_final, s_ref) < 3e-3
        got = run(triton_chunk.wkv6_triton, inputs, state, dy, ds)
        want = run(wkv6_naive, inputs, state, dy, ds)
        for name, g, w in zip(NAMES, got, want):
            assert rel_err(g, w) < 3e-3, name
        assert seen[-2:] == [triton_chunk.DEFAULT_CONFIG] * 2
        assert len(flags) == len(seen)  # one per forward (with and without gradients): the backward reads them
        for f in flags[-2:]:
            f = f.view(4, 3).cpu()
            if every:  # (at N = 64 some channel makes even the last 6 tokens steep)
                assert f[:, :2].gt(0).all()
            else:
                assert f.equal(some if steep else torch.zeros_like(some))


def test_pair_levels_beyond_two_are_named():
    from rwkvkit.errors import ConfigError

    inputs, state = rwkv6_like_inputs(1, 20, 2, HEAD, seed=9)
    with pytest.raises(ConfigError, match="pair_levels takes 0, 1 or 2"):
        triton_chunk.wkv6_triton(*inputs, state, config=triton_chunk.DEFAULT_CONFIG._replace(pair_levels=3))


def test_fp16_operands_are_a_wkv7_option():
    """The WKV6 kernels neither scale their gradients nor bound their pair factors for fp16: such a config is named."""
    from rwkvkit.errors import ConfigError

    inputs, state = rwkv6_like_inputs(1, 20, 2, HEAD, seed=9)
    with pytest.raises(ConfigError, match="'fp16' is a WKV7 option"):
        triton_chunk.wkv6_triton(*inputs, state, config=triton_chunk.KernelConfig(precision_chunk="fp16"))


@pytest.mark.parametrize("impl", ["triton", "chunked", "naive"])
def test_a_decay_of_neither_shape_is_named(impl):
    """w is [B, T, H, N] or RWKV-5's [H, N]; anything else (here [N, H], which the kernels would read as [H, N]) is
    refused by name on every path."""
    inputs, state = rwkv6_like_inputs(1, 20, 2, HEAD, seed=9)
    inputs[1] = inputs[1][0, 0].t().contiguous()
    fn = triton_chunk.wkv6_triton if impl == "triton" else lambda *x: wkv6(*x, impl=impl)
    with pytest.raises(ValueError, match=rf"w must be \[B, T, H, N\].* or \[H, N\].*got \({HEAD}, 2\)"):
        fn(*inputs, state)
