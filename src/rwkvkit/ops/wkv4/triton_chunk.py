"""RWKV-4 WKV in Triton, chunk-parallel: forward and backward, optional initial state, final state out.

The v4 state is per channel: (aa, bb, pp), the numerator and denominator of the weighted average scaled by e^{-pp},
pp being the running max exponent (the official max-subtracted form, exactly as `naive.py` writes it). A walk of
all T tokens per (batch row, block of channels) has only B x C / 32 warps to run (192 at B8 C768) and is bound by
the latency of its steps. So T is cut into CHUNK-token chunks and the walk becomes a three-pass scan:
  1. chunk-parallel: each chunk walked from the empty state gives the state it ends in by itself;
  2. sequential over chunks, one step per chunk: the state at every chunk start, from the one before it. With the
     true (unscaled) numerator A: A_end = e^{n w} A_start + A_chunk over n tokens, and so for the denominator; in
     scaled form that is the max-subtracted sum of the decayed start state and the chunk's own;
  3. chunk-parallel: each chunk walked again from its true start state, writing y (and, for a backward, the state
     after every token).

The backward does the same, in reverse, with the gradient carried back through the state. In scaled form
(ga_t = dL/da_t e^{p_t} with a_t = aa_t e^{p_t} the true numerator, gb_t likewise; gp_t the gradient reaching p_t
through the running max alone, which only starts at the final state's pp) the carry is linear, going back over t:
    ga_{t-1} = e^{w + p_{t-1} - p_t} ga_t + dy_t e1 / den,    gb_{t-1} likewise,    gp_{t-1} = [p_{t-1} + w >= k_t] gp_t
(every exponent there is <= 0, as p_t >= p_{t-1} + w). So pass 1 walks each chunk back from a zero carry and keeps
the carry it reaches, the product of its decays and whether every token kept the running max; pass 2 chains those
from the last chunk to the first; pass 3 walks each chunk back from its true carry, writing dk, dv and the chunk's
sums of dw and du. Per token, going back (y_t = (a_{t-1} + e^{u+k_t} v_t) / (b_{t-1} + e^{u+k_t}),
a_t = e^w a_{t-1} + e^{k_t} v_t, b_t likewise, p_t = max(p_{t-1} + w, k_t)): the output gives the direct dv_t, dk_t,
du and the carry's local terms; the update gives dv_t, dk_t and dw from the carry; the running max routes gp_t to
(p_{t-1}, w) or to k_t.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rwkvkit.ops import check_triton_device

from .naive import EMPTY_PP

# Tokens per chunk: the walks of passes 1 and 3 are CHUNK steps long, the carry passes T / CHUNK steps. On the H100
# (docs/gpu.md) 64 was the best or within 10% of it at B8 C768, B4 C2048 and B1 C768 among 32, 64 and 128.
CHUNK = 64
BLOCK = 128  # channels per program of the chunk passes (one per thread of 4 warps)
CARRY_BLOCK = 32  # channels per program of the carry passes (one warp: they are short walks, B x C / 32 programs)
EMPTY = tl.constexpr(EMPTY_PP)


@triton.jit
def _channels(i_block, w_ptr, C, BLOCK: tl.constexpr):
    """A program's channels (and which are inside C), with their decay."""
    cols = i_block * BLOCK + tl.arange(0, BLOCK)
    live = cols < C
    return cols, live, tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _load_state(ptr, cols, C, mask, pp_other):
    aa = tl.load(ptr + cols, mask=mask, other=0.0)
    bb = tl.load(ptr + C + cols, mask=mask, other=0.0)
    pp = tl.load(ptr + 2 * C + cols, mask=mask, other=pp_other)
    return aa, bb, pp


@triton.jit
def _store_state(ptr, cols, C, mask, aa, bb, pp):
    tl.store(ptr + cols, aa, mask=mask)
    tl.store(ptr + C + cols, bb, mask=mask)
    tl.store(ptr + 2 * C + cols, pp, mask=mask)


@triton.jit
def _token(ptr, b, t, T, C, cols, mask):
    """Token t's channels of a [B, T, C] input as float32."""
    return tl.load(ptr + (b * T + t) * C + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _before(i, n, live):
    """live & (i < n) as a vector (under the CPU interpreter the loop counter i is a plain int)."""
    return live & (tl.zeros_like(live.to(tl.int32)) + i < n)


@triton.jit
def _chunk_program(T, L: tl.constexpr):
    """A chunk pass's program: its chunk, batch row, first token and number of tokens (the last chunk may be short).
    Grid (chunks, B, channel blocks)."""
    i_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    start = i_c * L
    return i_c, b, start, tl.minimum(L, T - start)


@triton.jit
def _fwd_walk(w_ptr, u_ptr, k_ptr, v_ptr, starts_ptr, ends_ptr, y_ptr, states_ptr, T, C, n_chunks,
              LOCAL: tl.constexpr, SAVE: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr):
    """One chunk's walk. LOCAL (pass 1): from the empty state, storing only the state it ends in; else (pass 3) from
    the chunk's start state, storing y and, with SAVE, the state after every token."""
    i_c, b, start, n = _chunk_program(T, L)
    cols, live, w = _channels(tl.program_id(2), w_ptr, C, BLOCK)
    u = tl.load(u_ptr + cols, mask=live, other=0.0).to(tl.float32)
    at_chunk = (b * n_chunks + i_c) * 3 * C
    if LOCAL:
        aa = tl.zeros([BLOCK], dtype=tl.float32)
        bb = tl.zeros([BLOCK], dtype=tl.float32)
        pp = tl.full([BLOCK], EMPTY, dtype=tl.float32)
    else:
        aa, bb, pp = _load_state(starts_ptr + at_chunk, cols, C, live, EMPTY)
    # each token's loads are issued a token ahead, so the walk does not wait for them
    k_next = _token(k_ptr, b, start, T, C, cols, live)
    v_next = _token(v_ptr, b, start, T, C, cols, live)
    for i in range(n):
        t = start + i
        kt, vt = k_next, v_next
        ahead = _before(i + 1, n, live)
        k_next = _token(k_ptr, b, t + 1, T, C, cols, ahead)
        v_next = _token(v_ptr, b, t + 1, T, C, cols, ahead)
        if not LOCAL:
            q = tl.maximum(pp, u + kt)
            e1 = tl.exp(pp - q)
            e2 = tl.exp(u + kt - q)
            tl.store(y_ptr + (b * T + t) * C + cols, ((e1 * aa + e2 * vt) / (e1 * bb + e2)).to(
                y_ptr.dtype.element_ty), mask=live)
        q = tl.maximum(pp + w, kt)
        e1 = tl.exp(pp + w - q)
        e2 = tl.exp(kt - q)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = q
        if SAVE:
            _store_state(states_ptr + (b * T + t) * 3 * C, cols, C, live, aa, bb, pp)
    if LOCAL:
        _store_state(ends_ptr + at_chunk, cols, C, live, aa, bb, pp)


@triton.jit
def _fwd_carry(w_ptr, s0_ptr, ends_ptr, starts_ptr, s_final_ptr, T, C, n_chunks,
               HAS_S0: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: the state at every chunk start (the initial state, then each start decayed over its chunk and summed
    with the chunk's own end state), and the final state. Grid (B, channel blocks)."""
    b = tl.program_id(0).to(tl.int64)
    cols, live, w = _channels(tl.program_id(1), w_ptr, C, BLOCK)
    aa, bb, pp = _load_state(s0_ptr + b * 3 * C, cols, C, live & HAS_S0, EMPTY)  # empty: aa = bb = 0, pp = EMPTY
    at = b * n_chunks * 3 * C
    e_aa, e_bb, e_pp = _load_state(ends_ptr + at, cols, C, live, EMPTY)
    for i_c in range(n_chunks):
        _store_state(starts_ptr + at, cols, C, live, aa, bb, pp)
        c_aa, c_bb, c_pp = e_aa, e_bb, e_pp
        at += 3 * C
        e_aa, e_bb, e_pp = _load_state(ends_ptr + at, cols, C, _before(i_c + 1, n_chunks, live), EMPTY)
        decayed = pp + tl.minimum(L, T - i_c * L) * w
        q = tl.maximum(decayed, c_pp)
        e1 = tl.exp(decayed - q)
        e2 = tl.exp(c_pp - q)
        aa = e1 * aa + e2 * c_aa
        bb = e1 * bb + e2 * c_bb
        pp = q
    _store_state(s_final_ptr + b * 3 * C, cols, C, live, aa, bb, pp)


@triton.jit
def _bwd_token(k_ptr, v_ptr, dy_ptr, states_ptr, start_ptr, b, t, start, T, C, cols, mask):
    """What the backward reads for token t: k, v, dy and the state before it (the saved state after token t - 1, or
    the chunk's start state for its first token)."""
    kt = _token(k_ptr, b, t, T, C, cols, mask)
    vt = _token(v_ptr, b, t, T, C, cols, mask)
    dyt = _token(dy_ptr, b, t, T, C, cols, mask)
    t_vec = tl.zeros_like(cols) + t  # (a vector mask: see _before)
    inside = mask & (t_vec > start)
    first = mask & (t_vec == start)
    aa_i, bb_i, pp_i = _load_state(states_ptr + (b * T + t - 1) * 3 * C, cols, C, inside, 0.0)
    aa_f, bb_f, pp_f = _load_state(start_ptr, cols, C, first, 0.0)
    return kt, vt, dyt, aa_i + aa_f, bb_i + bb_f, pp_i + pp_f


@triton.jit
def _bwd_walk(w_ptr, u_ptr, k_ptr, v_ptr, dy_ptr, starts_ptr, states_ptr, carries_ptr, locals_ptr,
              dk_ptr, dv_ptr, dw_ptr, du_ptr, T, C, n_chunks,
              LOCAL: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr):
    """One chunk walked back. LOCAL (pass 1): from a zero carry, storing the carry it reaches at the chunk start,
    the product of its decays and whether every token kept the running max; else (pass 3) from the carry at the
    chunk's end, storing dk, dv and the chunk's sums of dw and du."""
    i_c, b, start, n = _chunk_program(T, L)
    cols, live, w = _channels(tl.program_id(2), w_ptr, C, BLOCK)
    u = tl.load(u_ptr + cols, mask=live, other=0.0).to(tl.float32)
    at_chunk = b * n_chunks + i_c
    start_ptr = starts_ptr + at_chunk * 3 * C
    if LOCAL:
        ga = tl.zeros([BLOCK], dtype=tl.float32)
        gb = tl.zeros([BLOCK], dtype=tl.float32)
        decays = tl.full([BLOCK], 1.0, dtype=tl.float32)
        kept = tl.full([BLOCK], 1.0, dtype=tl.float32)
    else:
        ga, gb, gp = _load_state(carries_ptr + at_chunk * 3 * C, cols, C, live, 0.0)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        du = tl.zeros([BLOCK], dtype=tl.float32)
    last = start + n - 1
    p_t = tl.load(states_ptr + (b * T + last) * 3 * C + 2 * C + cols, mask=live, other=0.0)
    # loads a token ahead, as in the forward
    k_n, v_n, dy_n, aa_n, bb_n, p_n = _bwd_token(k_ptr, v_ptr, dy_ptr, states_ptr, start_ptr, b, last, start, T, C,
                                                 cols, live)
    for i in range(n):
        t = last - i
        kt, vt, dyt, aa_p, bb_p, p_p = k_n, v_n, dy_n, aa_n, bb_n, p_n
        k_n, v_n, dy_n, aa_n, bb_n, p_n = _bwd_token(k_ptr, v_ptr, dy_ptr, states_ptr, start_ptr, b, t - 1, start,
                                                     T, C, cols, _before(i + 1, n, live))
        # the output: y_t = N / D with the max exponent q taken out of both
        q = tl.maximum(p_p, u + kt)
        e1 = tl.exp(p_p - q)
        e2 = tl.exp(u + kt - q)
        den = e1 * bb_p + e2
        y = (e1 * aa_p + e2 * vt) / den
        ga_p = dyt * e1 / den
        gb_p = -dyt * y * e1 / den
        # the state update, and the running max p_t = max(p_{t-1} + w, k_t)
        decay = tl.exp(w + p_p - p_t)
        keeps = p_p + w >= kt
        if LOCAL:
            decays *= decay
            kept = tl.where(keeps, kept, 0.0)
        else:
            dkt = dyt * e2 * (vt - y) / den
            du += dkt
            dvt = dyt * e2 / den
            ek = tl.exp(kt - p_t)
            dvt += ga * ek
            dkt += (ga * vt + gb) * ek
            dw += decay * (ga * aa_p + gb * bb_p)
            dw += tl.where(keeps, gp, 0.0)
            dkt += tl.where(keeps, 0.0, gp)
            gp = tl.where(keeps, gp, 0.0)
            at = (b * T + t) * C + cols
            tl.store(dk_ptr + at, dkt.to(dk_ptr.dtype.element_ty), mask=live)
            tl.store(dv_ptr + at, dvt.to(dv_ptr.dtype.element_ty), mask=live)
        ga = ga_p + decay * ga
        gb = gb_p + decay * gb
        p_t = p_p
    if LOCAL:
        at = locals_ptr + at_chunk * 4 * C + cols
        tl.store(at, ga, mask=live)
        tl.store(at + C, gb, mask=live)
        tl.store(at + 2 * C, decays, mask=live)
        tl.store(at + 3 * C, kept, mask=live)
    else:
        tl.store(dw_ptr + at_chunk * C + cols, dw, mask=live)
        tl.store(du_ptr + at_chunk * C + cols, du, mask=live)


@triton.jit
def _bwd_carry(w_ptr, states_ptr, starts_ptr, locals_ptr, ds_final_ptr, carries_ptr, ds0_ptr, T, C, n_chunks,
               HAS_S0: tl.constexpr, HAS_DS_FINAL: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2 of the backward: the carry at every chunk's end, from the final state's gradient back to the first
    chunk; and the initial state's gradient. Grid (B, channel blocks)."""
    b = tl.program_id(0).to(tl.int64)
    cols, live, _ = _channels(tl.program_id(1), w_ptr, C, BLOCK)
    if HAS_DS_FINAL:
        gaa, gbb, gpp = _load_state(ds_final_ptr + b * 3 * C, cols, C, live, 0.0)
        aa_T, bb_T, _ = _load_state(states_ptr + (b * T + T - 1) * 3 * C, cols, C, live, 0.0)
        ga = gaa
        gb = gbb
        gp = gpp - gaa * aa_T - gbb * bb_T  # aa_T = a_T e^{-p_T}: p_T also moves aa_T and bb_T
    else:
        ga = tl.zeros([BLOCK], dtype=tl.float32)
        gb = tl.zeros([BLOCK], dtype=tl.float32)
        gp = tl.zeros([BLOCK], dtype=tl.float32)
    at = b * n_chunks + n_chunks - 1
    for _ in range(n_chunks):
        _store_state(carries_ptr + at * 3 * C, cols, C, live, ga, gb, gp)
        local = locals_ptr + at * 4 * C + cols
        ga = tl.load(local, mask=live, other=0.0) + tl.load(local + 2 * C, mask=live, other=0.0) * ga
        gb = tl.load(local + C, mask=live, other=0.0) + tl.load(local + 2 * C, mask=live, other=0.0) * gb
        gp = tl.where(tl.load(local + 3 * C, mask=live, other=0.0) > 0.0, gp, 0.0)
        at -= 1
    if HAS_S0:  # a_0 = aa_0 e^{pp_0}
        aa0, bb0, _ = _load_state(starts_ptr + b * n_chunks * 3 * C, cols, C, live, 0.0)
        _store_state(ds0_ptr + b * 3 * C, cols, C, live, ga, gb, gp + ga * aa0 + gb * bb0)


def _grids(B, T, C):
    n_chunks = triton.cdiv(T, CHUNK)
    chunks = (n_chunks, B, triton.cdiv(C, BLOCK))
    carries = (B, triton.cdiv(C, CARRY_BLOCK))
    return n_chunks, chunks, carries


def _forward(w, u, k, v, s0, save: bool):
    """y, the final state, and for the backward (save) the state after every token and at every chunk start."""
    B, T, C = k.shape
    n_chunks, chunks, carries = _grids(B, T, C)
    f32 = dict(device=k.device, dtype=torch.float32)
    y = torch.empty_like(k)
    s_final = torch.empty(B, 3, C, **f32)
    ends = torch.empty(B, n_chunks, 3, C, **f32)
    starts = torch.empty_like(ends)
    states = torch.empty(B, T, 3, C, **f32) if save else s_final
    chunk_meta = dict(L=CHUNK, BLOCK=BLOCK, num_warps=BLOCK // 32)
    _fwd_walk[chunks](w, u, k, v, starts, ends, y, states, T, C, n_chunks, LOCAL=True, SAVE=False, **chunk_meta)
    _fwd_carry[carries](w, s0 if s0 is not None else s_final, ends, starts, s_final, T, C, n_chunks,
                        HAS_S0=s0 is not None, L=CHUNK, BLOCK=CARRY_BLOCK, num_warps=1)
    _fwd_walk[chunks](w, u, k, v, starts, ends, y, states, T, C, n_chunks, LOCAL=False, SAVE=save, **chunk_meta)
    return y, s_final, states, starts


def _backward(w, u, k, v, s0, states, starts, dy, ds_final):
    B, T, C = k.shape
    n_chunks, chunks, carries = _grids(B, T, C)
    f32 = dict(device=k.device, dtype=torch.float32)
    dy = torch.zeros_like(k) if dy is None else dy.contiguous()
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dw = torch.empty(B, n_chunks, C, **f32)
    du = torch.empty_like(dw)
    locals_ = torch.empty(B, n_chunks, 4, C, **f32)
    carried = torch.empty(B, n_chunks, 3, C, **f32)
    ds0 = torch.empty(B, 3, C, **f32) if s0 is not None else None
    chunk_meta = dict(L=CHUNK, BLOCK=BLOCK, num_warps=BLOCK // 32)
    walk = (w, u, k, v, dy, starts, states, carried, locals_, dk, dv, dw, du, T, C, n_chunks)
    _bwd_walk[chunks](*walk, LOCAL=True, **chunk_meta)
    _bwd_carry[carries](
        w, states, starts, locals_, ds_final.contiguous() if ds_final is not None else states, carried,
        ds0 if ds0 is not None else states, T, C, n_chunks,
        HAS_S0=s0 is not None, HAS_DS_FINAL=ds_final is not None, BLOCK=CARRY_BLOCK, num_warps=1,
    )  # fmt: skip
    _bwd_walk[chunks](*walk, LOCAL=False, **chunk_meta)
    return dw.sum((0, 1)), du.sum((0, 1)), dk, dv, ds0


class _WKV4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, s0):
        y, s_final, states, starts = _forward(w, u, k, v, s0, save=True)
        ctx.save_for_backward(w, u, k, v, s0, states, starts)
        ctx.set_materialize_grads(False)
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        w, u, k, v, s0, states, starts = ctx.saved_tensors
        dw, du, dk, dv, ds0 = _backward(w, u, k, v, s0, states, starts, dy, ds_final)
        return dw.to(w.dtype), du.to(u.dtype), dk, dv, ds0


@torch.compiler.disable  # one opaque call for torch.compile (it cannot trace the launch wrappers)
def wkv4_triton(w, u, k, v, initial_state=None):
    """Same contract as `rwkvkit.ops.wkv4.wkv4`: w, u [C], k, v [B, T, C], state [B, 3, C] float32."""
    check_triton_device(k, "WKV kernels", "chunked")
    w, u, k, v = (x.contiguous() for x in (w, u, k, v))
    s0 = None if initial_state is None else initial_state.float().contiguous()
    if k.shape[1] == 0:
        from .chunked import wkv4_chunked

        return wkv4_chunked(w, u, k, v, initial_state)
    tensors = (w, u, k, v) + (() if s0 is None else (s0,))
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return _WKV4.apply(w, u, k, v, s0)
    y, s_final, _, _ = _forward(w, u, k, v, s0, save=False)
    return y, s_final
