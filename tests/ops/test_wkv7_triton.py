"""The Triton WKV7 kernels against the naive recurrence: values, final state and every gradient.

Without a GPU the same kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1) at tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import (
    assert_kernel_matches, check_bf16_saved_states, compiled_blocks_match_eager, compiles_here, count_chunks_on,
    device_for_kernel_tests, fill_new_buffers_with_nan, spy_on_walk_grids,
)

DEVICE = device_for_kernel_tests("rwkvkit.ops.wkv7.triton_chunk")
ON_GPU = DEVICE == "cuda"

from rwkvkit.ops.testing import PACKED_LENGTHS  # noqa: E402
from rwkvkit.ops.varlen import cu_seqlens_of  # noqa: E402
from rwkvkit.ops.wkv7 import triton_chunk, wkv7  # noqa: E402
from rwkvkit.ops.wkv7.naive import wkv7_naive  # noqa: E402

HEAD = 64 if ON_GPU else 16


def rwkv7_like_inputs(B, T, H, N, dtype, seed):
    """Inputs shaped like a real RWKV-7 layer's: decay in (e^{-e^{-0.5}}, 1), a = -kk, b = kk * iclr, |kk| = 1."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -torch.exp(-torch.nn.functional.softplus(-randn(B, T, H, N)) - 0.5)
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    a, b = -kk, kk * torch.sigmoid(randn(B, T, H, N))
    state = randn(B, H, N, N) * 0.5
    return [x.to(DEVICE, dtype) for x in (r, w, k, v, a, b)], state.to(DEVICE)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def run(fn, inputs, state, dy, ds):
    """y, the final state, and the gradients of the inputs (and of the initial state) for dy on y and ds on the
    final state (either may be None: no gradient there)."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    s0 = None if state is None else state.clone().requires_grad_()
    y, s_final = fn(*leaves, s0)
    outputs, grads = zip(*[(o, g) for o, g in ((y, dy), (s_final, ds)) if g is not None])
    torch.autograd.backward(outputs, grads)
    grads = [x.grad for x in leaves] + ([] if s0 is None else [s0.grad])
    return [y, s_final, *grads]


# float32 products everywhere, so the kernels must match the naive loop to float32 rounding
EXACT = dict(precision_state="ieee", precision_chunk="ieee", precision_solve="ieee", block_v=16)

NAMES = ["y", "final_state", "dr", "dw", "dk", "dv", "da", "db", "d_initial_state"]


@pytest.mark.parametrize(
    "T, with_state, chunk, grad_chunk",
    # walks of 32 or 64 tokens with a gradient kernel of 16 (states at the sub-chunk starts), or of 32
    [(37, True, 16, 16), (16, False, 16, 16), (5, False, 16, 16), (45, True, 32, 16), (45, True, 32, 32),
     (70, False, 64, 16)],
)
def test_matches_naive_float32(T, with_state, chunk, grad_chunk, monkeypatch):
    inputs, state = rwkv7_like_inputs(2, T, 2, HEAD, torch.float32, seed=T)
    state = state if with_state else None
    dy = torch.randn(2, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(2, 2, HEAD, HEAD, device=DEVICE)
    cfg = triton_chunk.KernelConfig(chunk=chunk, grad_chunk=grad_chunk, **EXACT)
    got = assert_kernel_matches(wkv7_naive, lambda *x: triton_chunk.wkv7_triton(*x, config=cfg),
                                (inputs, state, dy, ds), NAMES, monkeypatch)
    assert len(got) == (9 if with_state else 8)


def test_backward_walk_takes_whole_heads_once_the_programs_fill_the_gpu(monkeypatch):
    """With enough sequences x heads (here: the threshold lowered to 1) and no block_v asked for, the backward walk
    takes all 32 value rows of a head in one program while the forward walk keeps blocks of 16; results as exact."""
    monkeypatch.setattr(triton_chunk, "WHOLE_HEAD_WALKS", 1)
    grids = spy_on_walk_grids(triton_chunk, monkeypatch)
    inputs, state = rwkv7_like_inputs(1, 37, 2, 32, torch.float32, seed=31)
    dy, ds = torch.randn(1, 37, 2, 32, device=DEVICE), torch.randn(1, 2, 32, 32, device=DEVICE)
    cfg = triton_chunk.KernelConfig(chunk=32, **{**EXACT, "block_v": None})
    assert_kernel_matches(wkv7_naive, lambda *x: triton_chunk.wkv7_triton(*x, config=cfg), (inputs, state, dy, ds),
                          NAMES, monkeypatch)
    assert grids == {"_fwd_state": [(2, 2)], "_bwd_state": [(1, 2)]}


def packed_case(lengths, with_state, seed):
    """Sequences of these lengths packed in one row: inputs, cu_seqlens, initial states (or None), dy, ds."""
    T, n = sum(lengths), len(lengths)
    inputs, _ = rwkv7_like_inputs(1, T, 2, HEAD, torch.float32, seed=seed)
    state = torch.randn(n, 2, HEAD, HEAD, device=DEVICE) * 0.5 if with_state else None
    return inputs, cu_seqlens_of(lengths).to(DEVICE), state, torch.randn(1, T, 2, HEAD, device=DEVICE), \
        torch.randn(n, 2, HEAD, HEAD, device=DEVICE)


@pytest.mark.parametrize("chunk, grad_chunk, with_state, cu_on", [
    (16, 16, True, "host"), (32, 16, False, "host"), (32, 16, True, "device"), (16, 16, False, "device")])
def test_packed_sequences_match_each_sequence_alone(chunk, grad_chunk, with_state, cu_on, monkeypatch):
    """cu_seqlens: sequences of odd lengths (one empty, one of a single token) packed in one row, one launch per
    kernel, against the naive loop on each sequence alone: outputs, every final state and all gradients, into
    NaN-filled buffers."""
    inputs, cu, state, dy, ds = packed_case(PACKED_LENGTHS, with_state, seed=14)
    cu = count_chunks_on(cu_on, cu, monkeypatch)
    cfg = triton_chunk.KernelConfig(chunk=chunk, grad_chunk=grad_chunk, **EXACT)
    got = assert_kernel_matches(lambda *x: wkv7(*x, impl="naive", cu_seqlens=cu),
                                lambda *x: triton_chunk.wkv7_triton(*x, config=cfg, cu_seqlens=cu),
                                (inputs, state, dy, ds), NAMES, monkeypatch)
    assert len(got) == (9 if with_state else 8)


def test_packed_sequences_default_config(monkeypatch):
    """The same through DEFAULT_CONFIG (with gradients, the registered op) in bf16: near the per-sequence loop."""
    inputs, cu, state, dy, ds = packed_case(PACKED_LENGTHS, True, seed=15)
    inputs = [x.bfloat16() for x in inputs]
    want = run(lambda *x: wkv7(*x, impl="naive", cu_seqlens=cu), [x.float() for x in inputs], state, dy, ds)
    fill_new_buffers_with_nan(monkeypatch)
    got = run(lambda *x: triton_chunk.wkv7_triton(*x, cu_seqlens=cu), inputs, state, dy.bfloat16(), ds)
    monkeypatch.undo()
    for name, g, w in zip(NAMES, got, want):
        assert torch.isfinite(g).all() and rel_err(g, w) < 1e-2, (name, rel_err(g, w))


def test_default_config_float32_within_tf32_rounding():
    """The default (tensor-core products on tf32-rounded operands) stays within a few 1e-4 of the naive loop."""
    T = 29
    inputs, state = rwkv7_like_inputs(1, T, 2, HEAD, torch.float32, seed=5)
    dy = torch.randn(1, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(1, 2, HEAD, HEAD, device=DEVICE)
    got = run(triton_chunk.wkv7_triton, inputs, state, dy, ds)
    want = run(wkv7_naive, inputs, state, dy, ds)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 3e-3, name


def test_calls_without_gradients_keep_no_sub_chunk_states(monkeypatch):
    """A call that wants no gradient keeps states at the walks' chunk starts only; one that does, at every
    gradient sub-chunk (the default config walks 32 tokens, its gradient kernel takes 16)."""
    seen = []
    forward = triton_chunk._forward

    def spy(*args, **kw):
        out = forward(*args, **kw)
        seen.append(out[2].shape[2])  # states kept per batch row and head
        return out

    monkeypatch.setattr(triton_chunk, "_forward", spy)
    inputs, state = rwkv7_like_inputs(1, 45, 2, HEAD, torch.float32, seed=6)
    with torch.no_grad():
        y, s_final = triton_chunk.wkv7_triton(*inputs, state)
    y_ref, s_ref = wkv7_naive(*inputs, state)
    assert rel_err(y, y_ref) < 3e-3 and rel_err(s_final, s_ref) < 3e-3
    leaves = [x.clone().requires_grad_() for x in inputs]
    triton_chunk.wkv7_triton(*leaves, state)
    assert triton_chunk.DEFAULT_CONFIG.chunk == 32 and triton_chunk.DEFAULT_CONFIG.grad_chunk == 16
    assert seen == [2, 4]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_half_outputs(dtype):
    """16-bit inputs give y in that dtype and a float32 state, close to the float32 loop on the same inputs."""
    inputs, state = rwkv7_like_inputs(1, 23, 2, HEAD, dtype, seed=1)
    with torch.no_grad():
        y, s_final = triton_chunk.wkv7_triton(*inputs, state)
    assert y.dtype == dtype and s_final.dtype == torch.float32
    y_ref, s_ref = wkv7_naive(*inputs, state)
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(s_final, s_ref) < 2e-3



def bf16_case(seed, T=45):
    """bf16 inputs with an initial state, random gradients on y and on the final state, and what the float64 loop
    gives for them (outputs and gradients)."""
    inputs, state = rwkv7_like_inputs(1, T, 2, HEAD, torch.bfloat16, seed=seed)
    dy = torch.randn(1, T, 2, HEAD, device=DEVICE).bfloat16()
    ds = torch.randn(1, 2, HEAD, HEAD, device=DEVICE)
    want = run(wkv7_naive, [x.double() for x in inputs], state.double(), dy.double(), ds.double())
    return inputs, state, dy, ds, want


def run_config(cfg, inputs, state, dy, ds):
    return run(lambda *x: triton_chunk.wkv7_triton(*x, config=cfg), inputs, state, dy, ds)


def test_half_inputs_save_bf16_states_and_stay_near_the_bf16_floor(monkeypatch):
    """With 16-bit inputs and gradients, the states (and state gradients) saved at the gradient sub-chunk starts are
    bf16; every output and gradient stays near the bf16 rounding of the float64 loop on the same inputs, and near
    what float32 saved states give."""
    inputs, state, dy, ds, want = bf16_case(seed=11)

    def run_with(cfg):
        return run_config(cfg, inputs, state, dy, ds)

    # DEFAULT_CONFIG itself: with gradients it runs as the registered op
    check_bf16_saved_states(monkeypatch, triton_chunk, run_with, triton_chunk.DEFAULT_CONFIG, want, NAMES)


def test_half_inputs_hand_the_walks_fp16_operands_that_change_nothing(monkeypatch):
    """With 16-bit inputs the walks load their decayed inputs in fp16, which holds the 10-bit mantissa their tf32
    products round to: the float32 results (final state, its input's gradient) match float32 operands to float32
    rounding, and the bf16 ones, which can only flip a last bit, are as close to the float64 loop (NaN-filled
    buffers). Float32 inputs keep float32 operands."""
    from rwkvkit.ops.testing import rel_rms

    inputs, state, dy, ds, want = bf16_case(seed=12)
    cfg = triton_chunk.DEFAULT_CONFIG
    assert cfg.half_walk_operands
    assert triton_chunk._walk_operand_dtype(inputs[0], cfg) == torch.float16
    assert triton_chunk._walk_operand_dtype(inputs[0].float(), cfg) == torch.float32
    fill_new_buffers_with_nan(monkeypatch)
    half, full = (run_config(c, inputs, state, dy, ds) for c in (cfg, cfg._replace(half_walk_operands=False)))
    for name, h, f, w in zip(NAMES, half, full, want):
        assert torch.isfinite(h).all(), name
        if h.dtype == torch.float32:
            assert rel_err(h, f) < 1e-5, (name, rel_err(h, f))
        else:
            assert rel_rms(h, w) < 1.05 * rel_rms(f, w), (name, rel_rms(h, w), rel_rms(f, w))


def test_fp16_operands_only_where_their_range_holds():
    """The default config's fp16 operands need 16-bit inputs and a known decay bound under which the in-chunk
    factors stay within fp16's range (RWKV-7's -e^{-0.5} per token); otherwise its products round to tf32."""
    fit = triton_chunk.fp16_operands_fit
    cfg = triton_chunk.DEFAULT_CONFIG
    assert cfg.uses_fp16() and cfg.precisions(False) == ("tf32r",) * 3
    assert fit(cfg, torch.bfloat16, -0.6065) and fit(cfg, torch.float16, -0.3)
    assert not fit(cfg, torch.float32, -0.6065)
    assert not fit(cfg, torch.bfloat16, -1.0) and not fit(cfg, torch.bfloat16, None)
    assert not fit(cfg._replace(grad_chunk=32), torch.bfloat16, -0.6065)  # the gradient kernel's factors: 2^9
    assert not fit(cfg._replace(chunk=64), torch.bfloat16, -0.6065)  # the walks' chunks' pair factors: 2^29


TF32R = dict(precision_state="tf32r", precision_chunk="tf32r", precision_solve="tf32r")


def assert_as_close_as_tf32(got, tf32, want, names):
    """Each of got within 5% (or 2% of the bf16 floor) of tf32's distance to the float64 want, and finite."""
    from rwkvkit.ops.testing import rel_rms

    for name, g, f, w in zip(names, got, tf32, want):
        floor = rel_rms(w.bfloat16(), w)
        assert torch.isfinite(g).all() and rel_rms(g, w) < 1.05 * rel_rms(f, w) + 0.02 * floor, name


def test_fp16_operands_as_accurate_as_tf32_ones(monkeypatch):
    """bf16 inputs: fp16 operands (the same 10-bit mantissa as tf32r) give every output and gradient as close to
    the float64 loop as tf32-rounded ones, into NaN-filled buffers: with gradients on y and on the final state (a
    backward that keeps tf32r), and on y alone (fp16 products in the backward too)."""
    inputs, state, dy, ds, want = bf16_case(seed=16)
    default, tf32 = triton_chunk.DEFAULT_CONFIG, triton_chunk.DEFAULT_CONFIG._replace(**TF32R)
    fill_new_buffers_with_nan(monkeypatch)
    assert_as_close_as_tf32(run_config(default, inputs, state, dy, ds), run_config(tf32, inputs, state, dy, ds),
                            want, NAMES)
    want = run(wkv7_naive, [x.double() for x in inputs], state.double(), dy.double(), None)
    got, tf = (run_config(c, inputs, state, dy, None) for c in (default, tf32))
    assert_as_close_as_tf32(got, tf, want, NAMES)


def test_fp16_operands_keep_tiny_gradients():
    """The backward scales dy by a power of two before its fp16 products, so gradients 2^-30 smaller (far under
    fp16's range) come out exactly 2^-30 smaller."""
    inputs, state, dy, _, _ = bf16_case(seed=17)
    fn = triton_chunk.wkv7_triton  # (DEFAULT_CONFIG)
    big, tiny = (run(fn, inputs, state, g, None)[2:] for g in (dy, dy * 2.0 ** -30))
    for name, b, t in zip(NAMES[2:], big, tiny):
        assert torch.equal(t.float() * 2.0 ** 30, b.float()), name


@pytest.mark.parametrize("small_chunk", [0, 1])
def test_fp16_operands_with_gradients_of_very_different_size_per_chunk(small_chunk, monkeypatch):
    """dy 2^-8 smaller in one of the two 32-token chunks: the backward's first kernel scales each chunk's dy by its
    own largest element, the rest by the largest of all; every gradient stays as close to the float64 loop as the
    tf32r config's (a chunk's part taken at the wrong scale would be 2^8 off). (Much smaller, the state gradient
    at the small chunk goes under fp16's range: the hazard the module doc names for dS_final.)"""
    inputs, state, dy, _, _ = bf16_case(seed=23)
    dy = dy.clone()
    dy[:, 32 * small_chunk:32 * (small_chunk + 1)] *= 2.0 ** -8
    want = run(wkv7_naive, [x.double() for x in inputs], state.double(), dy.double(), None)
    fill_new_buffers_with_nan(monkeypatch)
    got, tf = (run_config(c, inputs, state, dy, None)
               for c in (triton_chunk.DEFAULT_CONFIG, triton_chunk.DEFAULT_CONFIG._replace(**TF32R)))
    assert_as_close_as_tf32(got, tf, want, NAMES)


def test_initial_state_gradient_through_a_loss_masked_prompt(monkeypatch):
    """State tuning with a loss-masked prompt: dy is zero on the first 40 of 45 tokens, so the state gradient decays
    through them far below the largest |dy| (fp16 products in the walk gave d(initial state) 27x the bf16 floor);
    it stays near the floor, and every other gradient as close to the float64 loop as the tf32r config's."""
    torch.manual_seed(0)
    inputs, state, dy, _, _ = bf16_case(seed=29)
    dy = dy.clone()
    dy[:, :40] = 0
    want = run(wkv7_naive, [x.double() for x in inputs], state.double(), dy.double(), None)
    fill_new_buffers_with_nan(monkeypatch)
    got, tf = (run_config(c, inputs, state, dy, None)
               for c in (triton_chunk.DEFAULT_CONFIG, triton_chunk.DEFAULT_CONFIG._replace(**TF32R)))
    assert rel_err(got[-1], want[-1]) < 1.5 * rel_err(want[-1].bfloat16(), want[-1])
    assert_as_close_as_tf32(got[:-1], tf[:-1], want[:-1], NAMES[:-1])


def test_fp16_operands_not_in_a_backward_with_a_final_state_gradient():
    """A gradient on the final state alone (state tuning through a later chunk): walking back, the state gradient
    decays far below its size at the end (here about 1e-6 of it), under fp16's range; the backward keeps tf32r,
    and the gradients are as close to the float64 loop as the tf32r config's."""
    inputs, state, _, ds, _ = bf16_case(seed=19)
    want = run(wkv7_naive, [x.double() for x in inputs], state.double(), None, ds.double())
    got, tf = (run_config(c, inputs, state, None, ds)
               for c in (triton_chunk.DEFAULT_CONFIG, triton_chunk.DEFAULT_CONFIG._replace(**TF32R)))
    assert want[2] is None and not got[2].any()  # r reaches y only
    others = [i for i in range(len(NAMES)) if i != 2]
    assert_as_close_as_tf32(*([x[i] for i in others] for x in (got, tf, want)), [NAMES[i] for i in others])


def test_fp16_operands_at_the_steepest_decay_stay_finite():
    """Every token at RWKV-7's steepest decay, with large inputs: the 32-token chunks' pair factors reach
    e^{17 * 0.61} = 2^15, so their inputs are scaled to a largest element in [1, 2) first, and nothing overflows
    fp16."""
    from rwkvkit.ops.testing import V7_MIN_LOG_DECAY, rel_rms

    T = 45
    inputs, state = rwkv7_like_inputs(1, T, 2, HEAD, torch.float32, seed=18)
    r, w, k, v, a, b = inputs
    inputs = [x.bfloat16() for x in (r * 8, torch.full_like(w, V7_MIN_LOG_DECAY), k * 8, v * 8, a, b)]
    dy = torch.randn(1, T, 2, HEAD, device=DEVICE).bfloat16()
    ds = torch.randn(1, 2, HEAD, HEAD, device=DEVICE)
    want = run(wkv7_naive, [x.double() for x in inputs], state.double(), dy.double(), ds.double())
    got = run(lambda *x: triton_chunk.wkv7_triton(*x, log_decay_min=V7_MIN_LOG_DECAY), inputs, state, dy, ds)
    for name, g, w in zip(NAMES, got, want):
        assert torch.isfinite(g).all() and rel_rms(g, w) < 3 * rel_rms(w.bfloat16(), w), name


def test_decays_too_steep_for_the_kernels_take_the_chunked_path(monkeypatch):
    """Below log_decay_floor (-4.2 for 32-token chunks) the kernels' in-chunk factors overflow; the call finds w's
    minimum and hands such inputs to the chunked path (exact for any w). A caller's bound skips that check."""
    T = 45
    inputs, state = rwkv7_like_inputs(1, T, 2, HEAD, torch.float32, seed=13)
    inputs[1][:, :, 0] = -6.0  # one head decays by e^-6 per token: e^{16 * 6} overflows float32
    dy = torch.randn(1, T, 2, HEAD, device=DEVICE)
    ds = torch.randn(1, 2, HEAD, HEAD, device=DEVICE)
    checks = []
    lowest = triton_chunk._lowest_log_decay
    monkeypatch.setattr(triton_chunk, "_lowest_log_decay", lambda w: checks.append(1) or lowest(w))
    want = run(wkv7_naive, inputs, state, dy, ds)
    got = run(triton_chunk.wkv7_triton, inputs, state, dy, ds)
    assert len(checks) == 1
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-5, name
    # with a bound (the model's), the kernels run without the check
    inputs[1][:, :, 0] = -0.5
    with torch.no_grad():
        y, s_final = triton_chunk.wkv7_triton(*inputs, state, log_decay_min=-0.61)
    y_ref, s_ref = wkv7_naive(*inputs, state)
    assert len(checks) == 1 and rel_err(y, y_ref) < 3e-3 and rel_err(s_final, s_ref) < 3e-3


def test_no_grad_path_matches_and_inputs_untouched():
    inputs, state = rwkv7_like_inputs(1, 19, 1, HEAD, torch.float32, seed=2)
    before = [x.clone() for x in inputs] + [state.clone()]
    with torch.no_grad():
        y, s_final = triton_chunk.wkv7_triton(*inputs, state, config=triton_chunk.KernelConfig(**EXACT))
    y_ref, s_ref = wkv7_naive(*inputs, state)
    assert rel_err(y, y_ref) < 2e-5 and rel_err(s_final, s_ref) < 2e-5
    for x, x0 in zip(inputs + [state], before):
        assert torch.equal(x, x0)


def test_state_chains_across_calls():
    """Running T tokens at once equals running them in two calls that hand the state over."""
    inputs, _ = rwkv7_like_inputs(1, 40, 1, HEAD, torch.float32, seed=3)
    cfg = triton_chunk.KernelConfig(**EXACT)
    with torch.no_grad():
        y_all, s_all = triton_chunk.wkv7_triton(*inputs, config=cfg)
        y1, s1 = triton_chunk.wkv7_triton(*(x[:, :17] for x in inputs), config=cfg)
        y2, s2 = triton_chunk.wkv7_triton(*(x[:, 17:] for x in inputs), s1, config=cfg)
    assert rel_err(torch.cat([y1, y2], 1), y_all) < 2e-5
    assert rel_err(s2, s_all) < 2e-5


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    from rwkvkit.errors import ConfigError

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs, _ = rwkv7_like_inputs(1, 4, 1, HEAD, torch.float32, seed=4)
    with pytest.raises(ConfigError, match="CUDA"):
        triton_chunk.wkv7_triton(*(x.cpu() for x in inputs))


@compiles_here
def test_model_compiles_without_graph_breaks_and_keeps_gradients(monkeypatch):
    """The kernel is a registered op, so torch.compile keeps each time-mix in one graph around it, and the compiled
    loss and gradients equal eager ones."""
    import functools

    import rwkvkit.models.v7 as v7
    from rwkvkit.models import RWKVConfig, build_model

    monkeypatch.setattr(v7, "wkv7", functools.partial(wkv7, impl="triton"))
    torch.manual_seed(0)
    model = build_model(RWKVConfig("7", 3, 4 * HEAD, 100, head_size=HEAD), init=True).to(DEVICE)
    idx = torch.randint(0, 100, (2, 21), device=DEVICE)
    # time-mix of layer 0 (defines v_first), of the others, one channel-mix graph for all
    assert compiled_blocks_match_eager(model, idx, monkeypatch) == 3


@pytest.mark.parametrize("chunk, grad_chunk", [(32, 64), (24, 16), (32, 8)])
def test_a_config_the_kernels_cannot_run_is_named(chunk, grad_chunk):
    from rwkvkit.errors import ConfigError

    inputs, state = rwkv7_like_inputs(1, 20, 2, HEAD, torch.float32, seed=9)
    cfg = triton_chunk.KernelConfig(chunk=chunk, grad_chunk=grad_chunk)
    with pytest.raises(ConfigError, match=f"chunk={chunk} grad_chunk={grad_chunk}"):
        triton_chunk.wkv7_triton(*inputs, state, config=cfg)


def test_a_wkv6_only_option_is_refused():
    from rwkvkit.errors import ConfigError

    inputs, state = rwkv7_like_inputs(1, 20, 2, HEAD, torch.float32, seed=9)
    with pytest.raises(ConfigError, match="pair_levels is a WKV6 option"):
        triton_chunk.wkv7_triton(*inputs, state, config=triton_chunk.KernelConfig(pair_levels=1))
