"""The CPU WKV ops (naive ground truth, chunked form, T == 1 step, dispatcher) of RWKV v4, v5/v6 and v7."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from rwkvkit.ops.testing import PACKED_LENGTHS, rel_rms, run_with_grads, wkv4_inputs, wkv6_inputs, wkv7_inputs
from rwkvkit.ops.varlen import cu_seqlens_of
from rwkvkit.ops.wkv4 import wkv4, wkv4_chunked, wkv4_naive, wkv4_step
from rwkvkit.ops.wkv6 import wkv6, wkv6_chunked, wkv6_naive, wkv6_step
from rwkvkit.ops.wkv7 import wkv7, wkv7_chunked, wkv7_naive, wkv7_step

TOL = 1e-5  # float32 chunked vs float32 naive, values and gradients (reached: ~1e-7 to 1e-6)


@dataclass
class Op:
    name: str
    naive: Callable
    chunked: Callable
    step: Callable
    dispatch: Callable
    make: Callable  # (B, T, seed, **kw) -> (inputs, initial_state)
    per_token: tuple[bool, ...]  # which inputs have a time axis (dim 1)

    def out_like(self, inputs):
        """Random upstream gradients shaped like (y, final_state)."""
        y, s = self.naive(*inputs)
        return torch.randn_like(y, dtype=torch.float32), torch.randn_like(s)


def _make7(B, T, seed, N=8, **kw):
    return wkv7_inputs(B, T, 2, N, seed=seed, **kw)


def _make6(B, T, seed, N=8, **kw):
    return wkv6_inputs(B, T, 2, N, seed=seed, **kw)


def _make4(B, T, seed, N=8, **kw):
    return wkv4_inputs(B, T, 2 * N, seed=seed, **kw)


OPS = {
    "wkv7": Op("wkv7", wkv7_naive, wkv7_chunked, wkv7_step, wkv7, _make7, (True,) * 6),
    "wkv6": Op("wkv6", wkv6_naive, wkv6_chunked, wkv6_step, wkv6, _make6, (True,) * 4 + (False,)),
    "wkv4": Op("wkv4", wkv4_naive, wkv4_chunked, wkv4_step, wkv4, _make4, (False, False, True, True)),
}
ALL = pytest.mark.parametrize("op", list(OPS.values()), ids=list(OPS))


def _time_slice(op, inputs, lo, hi):
    return [x[:, lo:hi] if timed else x for x, timed in zip(inputs, op.per_token)]


def _assert_close(got, want, tol=TOL, what=""):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, i)
        assert torch.isfinite(g).all(), (what, i)
        assert rel_rms(g, w) < tol, (what, i, rel_rms(g, w))


@ALL
@pytest.mark.parametrize(
    "T, chunk, with_state", [(1, 16, True), (7, 4, False), (33, 16, True), (65, 8, False), (40, 32, True)]
)
def test_chunked_matches_naive_values_and_all_gradients(op, T, chunk, with_state):
    inputs, state = op.make(2, T, seed=T)
    state = state if with_state else None
    dy, ds = op.out_like(inputs)
    want = run_with_grads(op.naive, inputs, state, dy, ds)
    got = run_with_grads(lambda *x: op.chunked(*x, chunk_size=chunk), inputs, state, dy, ds)
    assert len(got) == len(op.per_token) + 2 + with_state
    _assert_close(got, want, what=op.name)


@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
def test_chunked_head_size_64(op):
    op = OPS[op]
    inputs, state = op.make(1, 45, seed=5, N=64)
    dy, ds = op.out_like(inputs)
    want = run_with_grads(op.naive, inputs, state, dy, ds)
    got = run_with_grads(op.chunked, inputs, state, dy, ds)  # default chunk sizes
    _assert_close(got, want, what=op.name)


@ALL
def test_state_carries_across_calls_and_single_steps(op):
    """op(x) == op(x[:a]) then op(x[a:], state) == token-by-token T == 1 steps, for chunked and naive."""
    T = 29
    inputs, state = op.make(1, T, seed=3)
    y_all, s_all = op.chunked(*inputs, state, chunk_size=8)
    for fn in (op.chunked, op.naive):
        y1, s1 = fn(*_time_slice(op, inputs, 0, 11), state)
        y2, s2 = fn(*_time_slice(op, inputs, 11, T), s1)
        _assert_close([torch.cat([y1, y2], 1), s2], [y_all, s_all])
    s, ys = state, []
    for t in range(T):
        y, s = op.step(*_time_slice(op, inputs, t, t + 1), s)
        ys.append(y)
    _assert_close([torch.cat(ys, 1), s], [y_all, s_all])
    for impl in ("auto", "chunked"):  # both take the single-step path at T == 1
        y1, s1 = op.dispatch(*_time_slice(op, inputs, 0, 1), state, impl=impl)
        assert torch.equal(y1, ys[0]) and torch.equal(s1, op.step(*_time_slice(op, inputs, 0, 1), state)[1])


@pytest.mark.parametrize(
    "op, kw",
    [
        ("wkv6", dict(raw_decay_shift=0.0, raw_decay_scale=5.0)),  # w from ~-1e-5 (decay ~1) to ~-1e5 (decay 0)
        ("wkv6", dict(raw_decay_shift=12.0, raw_decay_scale=0.1)),  # every decay ~0 (w ~ -1.6e5)
        ("wkv6", dict(raw_decay_shift=-14.0, raw_decay_scale=0.1)),  # every decay within 1e-6 of 1
        ("wkv7", dict(log_decay_range=(-0.6066, -0.6065))),  # the steepest v7 decay everywhere
        ("wkv7", dict(log_decay_range=(-1e-6, 0.0))),  # decay ~1
        ("wkv7", dict(log_decay_range=(-5.0, 0.0))),  # outside the v7 range: the chunk shrinks (16 -> 8)
        ("wkv7", dict(log_decay_range=(-80.0, 0.0))),  # far outside: single steps
        ("wkv4", dict(k_scale=40.0, decay_scale=4.0)),  # |k| up to ~100, w from ~-1e-3 to ~-3e3
    ],
)
def test_extreme_decays_stay_finite_and_exact(op, kw):
    op = OPS[op]
    inputs, state = op.make(2, 37, seed=7, **kw)
    dy, ds = op.out_like(inputs)
    want = run_with_grads(op.naive, inputs, state, dy, ds)
    got = run_with_grads(lambda *x: op.chunked(*x, chunk_size=16), inputs, state, dy, ds)
    _assert_close(got, want, what=kw)


def test_wkv4_extreme_keys_match_float64():
    """Large k: both forms agree with a float64 evaluation of the defining weighted average."""
    (w, u, k, v), _ = wkv4_inputs(1, 24, 6, seed=2, k_scale=40.0, decay_scale=3.0)
    y_ref = _wkv4_float64(w, u, k, v)
    for fn in (wkv4_naive, wkv4_chunked):
        y, _ = fn(w, u, k, v)
        assert rel_rms(y, y_ref) < 1e-5


@ALL
@pytest.mark.parametrize("T", [1, 19])
def test_bf16_in_bf16_out_float32_state(op, T):
    inputs, state = op.make(1, T, seed=11)
    half = [x.to(torch.bfloat16) for x in inputs]
    y, s = op.dispatch(*half, state)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, s_ref = op.naive(*[x.float() for x in half], state)  # float32 math on the same rounded inputs
    assert rel_rms(y, y_ref) < 1e-2 and rel_rms(s, s_ref) < 1e-5


@ALL
@pytest.mark.parametrize("impl", ["naive", "chunked", "auto"])
def test_inputs_are_not_modified(op, impl):
    inputs, state = op.make(1, 9, seed=4)
    before = [x.clone() for x in (*inputs, state)]
    op.dispatch(*inputs, state, impl=impl)
    assert all(torch.equal(x, x0) for x, x0 in zip((*inputs, state), before))


@ALL
def test_dispatch_rejects_unknown_impl(op):
    inputs, _ = op.make(1, 3, seed=0)
    with pytest.raises(ValueError, match="naive"):
        op.dispatch(*inputs, impl="fastest")


@ALL
def test_no_initial_state_means_empty_state(op):
    inputs, _ = op.make(1, 6, seed=6)
    y, s = op.dispatch(*inputs)
    empty = torch.zeros_like(s)
    if op.name == "wkv4":
        empty[:, 2] = -1e38
    y2, s2 = op.dispatch(*inputs, empty)
    _assert_close([y2, s2], [y, s], tol=1e-7)


# --- independent float64 scalar loops, written straight from the formulas in docs/design.md ---


def _wkv7_float64(r, w, k, v, a, b, s0):
    B, T, H, N = r.shape
    r, w, k, v, a, b = (x.double().tolist() for x in (r, w, k, v, a, b))
    S = s0.double().tolist()
    y = [[[[0.0] * N for _ in range(H)] for _ in range(T)] for _ in range(B)]
    for bi in range(B):
        for h in range(H):
            st = S[bi][h]
            for t in range(T):
                at, bt, kt, rt = a[bi][t][h], b[bi][t][h], k[bi][t][h], r[bi][t][h]
                for i in range(N):
                    sa = sum(st[i][j] * at[j] for j in range(N))
                    for j in range(N):
                        st[i][j] = st[i][j] * math.exp(w[bi][t][h][j]) + sa * bt[j] + v[bi][t][h][i] * kt[j]
                    y[bi][t][h][i] = sum(st[i][j] * rt[j] for j in range(N))
    return torch.tensor(y, dtype=torch.float64), torch.tensor(S, dtype=torch.float64)


def _wkv6_float64(r, w, k, v, u, s0):
    B, T, H, N = r.shape
    r, w, k, v, u = (x.double().tolist() for x in (r, w, k, v, u))
    S = s0.double().tolist()
    y = [[[[0.0] * N for _ in range(H)] for _ in range(T)] for _ in range(B)]
    for bi in range(B):
        for h in range(H):
            st = S[bi][h]
            for t in range(T):
                rt, kt, vt = r[bi][t][h], k[bi][t][h], v[bi][t][h]
                for j in range(N):
                    y[bi][t][h][j] = sum(rt[i] * (st[i][j] + u[h][i] * kt[i] * vt[j]) for i in range(N))
                for i in range(N):
                    for j in range(N):
                        st[i][j] = math.exp(w[bi][t][h][i]) * st[i][j] + kt[i] * vt[j]
    return torch.tensor(y, dtype=torch.float64), torch.tensor(S, dtype=torch.float64)


def _wkv4_float64(w, u, k, v):
    """The defining sum (empty initial state), each output normalised by its own largest exponent."""
    B, T, C = k.shape
    w, u, k, v = (x.double() for x in (w, u, k, v))
    y = torch.empty(B, T, C, dtype=torch.float64)
    for t in range(T):
        past = k[:, :t] + (t - 1 - torch.arange(t, dtype=torch.float64))[:, None] * w
        expo = torch.cat([past, (u + k[:, t])[:, None]], 1)
        weights = torch.exp(expo - expo.amax(1, keepdim=True))
        y[:, t] = (weights * v[:, : t + 1]).sum(1) / weights.sum(1)
    return y


def test_naive_matches_float64_scalar_loops():
    inputs7, s7 = wkv7_inputs(1, 5, 2, 3, seed=1)
    y_ref, s_ref = _wkv7_float64(*inputs7, s7)
    y, s = wkv7_naive(*inputs7, s7)
    assert rel_rms(y, y_ref) < 1e-6 and rel_rms(s, s_ref) < 1e-6
    assert s.shape == (1, 2, 3, 3)  # value-major [B, H, N_v, N_k]

    inputs6, s6 = wkv6_inputs(1, 5, 2, 3, seed=1)
    y_ref, s_ref = _wkv6_float64(*inputs6, s6)
    y, s = wkv6_naive(*inputs6, s6)
    assert rel_rms(y, y_ref) < 1e-6 and rel_rms(s, s_ref) < 1e-6

    (w, u, k, v), _ = wkv4_inputs(2, 9, 5, seed=1, k_scale=3.0)
    y, _ = wkv4_naive(w, u, k, v)
    assert rel_rms(y, _wkv4_float64(w, u, k, v)) < 1e-6


PACKED = pytest.mark.parametrize("op", [OPS["wkv7"], OPS["wkv6"]], ids=["wkv7", "wkv6"])


@PACKED
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_packed_sequences_equal_separate_calls(op, impl):
    """cu_seqlens: each sequence of the packed row runs from its own state to its own final state, exactly as a
    call of its own (values and gradients, an empty and a one-token sequence among them)."""
    lengths = PACKED_LENGTHS
    inputs, _ = op.make(1, sum(lengths), seed=21)
    state = torch.randn(len(lengths), 2, 8, 8, generator=torch.Generator().manual_seed(1))
    dy, ds = torch.randn(1, sum(lengths), 2, 8), torch.randn(len(lengths), 2, 8, 8)
    cu = cu_seqlens_of(lengths)
    got = run_with_grads(lambda *x: op.dispatch(*x, impl=impl, cu_seqlens=cu), inputs, state, dy, ds)
    per_head_grads = [torch.zeros_like(x) for x, timed in zip(inputs, op.per_token) if not timed]
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if start == end:  # an empty sequence hands its state through
            assert torch.equal(got[1][i], state[i]) and torch.equal(got[-1][i], ds[i])
            continue
        one = [x[:, start:end] if timed else x for x, timed in zip(inputs, op.per_token)]
        want = run_with_grads(op.naive, one, state[i : i + 1], dy[:, start:end], ds[i : i + 1])
        assert rel_rms(got[0][:, start:end], want[0]) < TOL
        assert rel_rms(got[1][i], want[1][0]) < TOL
        for g, w, timed in zip(got[2:], want[2:], op.per_token):
            if timed:
                assert rel_rms(g[:, start:end], w) < TOL
        for total, w in zip(per_head_grads, [w for w, timed in zip(want[2:], op.per_token) if not timed]):
            total += w
        assert rel_rms(got[-1][i], want[-1][0]) < TOL
    for g, total in zip([g for g, timed in zip(got[2:], op.per_token) if not timed], per_head_grads):
        assert rel_rms(g, total) < TOL  # (WKV6's bonus u: summed over the sequences)


@PACKED
def test_bad_cu_seqlens_are_named(op):
    from rwkvkit.errors import ConfigError

    inputs, state = op.make(1, 10, seed=22)
    for cu, message in [(torch.tensor([1, 10]), "from 0"), (torch.tensor([0, 6, 4, 10]), "decreasing"),
                        (torch.tensor([0, 9]), "T_total = 10"), (torch.tensor([0.0, 10.0]), "integer"),
                        (torch.tensor([[0, 10]]), "1-D")]:
        with pytest.raises(ConfigError, match=message):
            op.dispatch(*inputs, impl="chunked", cu_seqlens=cu)
    with pytest.raises(ConfigError, match="one state per sequence"):
        op.dispatch(*inputs, state.expand(2, *state.shape[1:]), impl="chunked", cu_seqlens=torch.tensor([0, 10]))
    two_rows, _ = op.make(2, 10, seed=22)
    with pytest.raises(ConfigError, match="one batch row"):
        op.dispatch(*two_rows, impl="chunked", cu_seqlens=torch.tensor([0, 10]))


def test_chunk_maps_counted_or_bounded_agree(monkeypatch):
    """The kernels' packed-sequence tables: counted from CPU cu_seqlens, or sized by chunk_bound (as from GPU ones,
    whose count would wait for the GPU) with the spare rows marked -1; the same rows either way, and kept for the
    next call with the same cu_seqlens until it changes in place."""
    from rwkvkit.ops import varlen

    cu = cu_seqlens_of(PACKED_LENGTHS)  # chunks of 16: 1 + 0 + 3 + 1 + 1 + 2
    exact = varlen.chunk_map(cu, 79, 16, torch.device("cpu"))
    assert exact.n_chunks == 8 and exact.n_seqs == 6
    assert exact.seq_table.tolist() == [[0, 5, 0, 0], [5, 0, 1, 0], [5, 37, 1, 0], [42, 16, 4, 0], [58, 1, 5, 0],
                                        [59, 20, 6, 0]]
    assert exact.chunk_table[:, 0].tolist() == [0, 0, 1, 2, 0, 0, 0, 1]  # each chunk's place in its sequence
    assert varlen.chunk_map(cu, 79, 16, torch.device("cpu")) is exact
    monkeypatch.setattr(varlen, "counting_is_free", lambda cu: False)
    cu += 0  # an in-place change: a new map
    bound = varlen.chunk_map(cu, 79, 16, torch.device("cpu"))
    assert bound.n_chunks == varlen.chunk_bound(79, 6, 16) == 10
    assert torch.equal(bound.chunk_table[:8], exact.chunk_table) and bound.chunk_table[8:, 0].tolist() == [-1, -1]


def test_cu_seqlens_values_are_not_read_while_torch_compile_traces():
    """Reading them would break the graph at every WKV call of a compiled block (the models check them first)."""
    from rwkvkit.ops.varlen import check_cu_seqlens

    fn = torch.compile(lambda cu, x: x.sum() + check_cu_seqlens(cu, x, None), fullgraph=True, backend="eager")
    assert fn(torch.tensor([0, 2, 5], dtype=torch.int32), torch.ones(1, 5, 2, 4)).item() == 40 + 2
