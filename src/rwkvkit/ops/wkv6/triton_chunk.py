"""Chunked RWKV-5/6 WKV in Triton: forward and backward, optional initial state, final state out.

Per head, with the state S [N_k, N_v] (key-major) and G_t = w_1 + ... + w_t the in-chunk cumulative log decay, a
chunk of C tokens that starts from S_0 gives

    y_t = (r_t e^{G_{t-1}})^T S_0 + sum_{j<t} <r_t, k_j e^{G_{t-1}-G_j}> v_j + <r_t, u k_t> v_t
    S_C = diag(e^{G_C}) S_0 + sum_j (k_j e^{G_C-G_j}) v_j^T

so y = R~ S_0 + M V with a C x C lower-triangular M (the bonus u on its diagonal). As in the WKV7 kernel, the pair
exponent is split around the chunk's middle token (or, with `pair_halves`, around each half's; log_decay_floor
says why), the sequential walks carry only the state, and the products run on tensor cores with operands rounded
to tf32 (see rwkvkit.ops.wkv7.triton_chunk for the reasons).

Kernels: _fwd_state (sequential: keeps every chunk's S_0), _fwd_out (chunk-parallel), _bwd_state (sequential,
backwards: dL/dS at every chunk end), _bwd_chunk (chunk-parallel: all gradients; du summed afterwards).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rwkvkit.ops import check_triton_device, device_sync_allowed
from rwkvkit.ops.varlen import check_cu_seqlens
from rwkvkit.ops.wkv7.triton_chunk import (
    KernelConfig, _chunk_program, _dot, _layout, _lowest_log_decay, _round_to_tf32, _row, _saved_dtype, _sequence,
    _supported, _tile_offsets, log_decay_floor,
)

# The kernels take log decays below log_decay_floor(config) as that floor: at -14.4 (16-token chunks with
# `pair_halves`) a channel keeps under 6e-7 of its state per token, a change far below the products' tf32
# rounding; the decay gradient there is 0, as for a clamp.

# config=None picks by the call's lowest log decay (one GPU sync) the fastest config whose floor changes nothing.
# H100, B8 / B4 T4096, fwd+bwd ms: 32-token chunks throughout 1.61 / 1.91 (fewer states to store and load, half
# the walk steps; floor -4.2), 16-token chunks 2.13 / 2.55 (floor -8), 16 with the pair factors split per half
# chunk 2.48 / 3.00 (floor -14.4; the split's extra products). The last is DEFAULT_CONFIG, for decays below -8
# (RWKV-5/6's w = -exp(time_decay + lora) has no lower bound; with -8 as the floor such inputs had dw at 2.2x the
# bf16 error floor) and inside CUDA graphs, where the check cannot wait for the GPU.
LONG_CHUNK_CONFIG = KernelConfig(chunk=32, grad_chunk=32)
SHORT_CHUNK_CONFIG = KernelConfig()
DEFAULT_CONFIG = KernelConfig(pair_halves=True)


@triton.jit
def _load_log_decay(w, pk, live, W_MIN: tl.constexpr):
    """A chunk's log decays, floored at W_MIN (log_decay_floor of the config)."""
    return tl.maximum(tl.load(w + pk, mask=live, other=0.0).to(tl.float32), W_MIN)


@triton.jit
def _pair_factors(G, ww, C: tl.constexpr, HALVES: tl.constexpr):
    """The in-chunk pair weight e^{G_{t-1}-G_j} (j < t) as a product of a t-side and a j-side factor that stay
    finite: (a_in, b_in) = (e^{G_{t-1}-G_ref}, e^{G_ref-G_j}) around the chunk's middle token, or with HALVES
    around the middle of each half (for pairs within a half) plus (a_x, b_x) around the first half's last token for
    the pairs across the halves (both <= 1; zero outside their half). Without HALVES a_x, b_x are unused zeros."""
    if HALVES:
        first = (tl.arange(0, C) < C // 2)[:, None]
        g_ref = tl.where(first, _row(G, C // 4, C)[None, :], _row(G, C // 2 + C // 4, C)[None, :])
        g_x = _row(G, C // 2 - 1, C)[None, :]
        a_x = tl.where(first, 0.0, tl.exp(G - ww - g_x))
        b_x = tl.where(first, tl.exp(g_x - G), 0.0)
    else:
        g_ref = _row(G, C // 2, C)[None, :]
        a_x = tl.zeros_like(G)
        b_x = tl.zeros_like(G)
    return tl.exp(G - ww - g_ref), tl.exp(g_ref - G), a_x, b_x


@triton.jit
def _same_half(C: tl.constexpr):
    rows = tl.arange(0, C)
    return (rows[:, None] < C // 2) == (rows[None, :] < C // 2)


@triton.jit
def _fwd_state(
    w, k, v, s0, states, s_final, seq_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, SUB: tl.constexpr, PS: tl.constexpr, HAS_S0: tl.constexpr,
    W_MIN: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """S_C = diag(e^{G_C}) S_0 + K_e^T V, chunk after chunk; every S_0 is kept for the outputs and the backward."""
    i_v = tl.program_id(0)
    i_sh = tl.program_id(1).to(tl.int64)  # sequence x head
    i_h, bos, T, base = _sequence(i_sh, T, H, C, seq_table, VARLEN)
    cols_k = tl.arange(0, K)
    cols_v = i_v * BV + tl.arange(0, BV)
    s_offs = cols_k[:, None] * V + cols_v[None, :]
    if HAS_S0:
        S = tl.load(s0 + i_sh * K * V + s_offs).to(tl.float32)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    for i_t in range(tl.cdiv(T, C)):
        tl.store(states + (base + i_t) * (C // SUB) * K * V + s_offs, S)
        tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
        ww = _load_log_decay(w, pk, live, W_MIN)
        kk = tl.load(k + pk, mask=live, other=0.0).to(tl.float32)
        vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
        g_end = tl.sum(ww, 0)
        k_e = kk * tl.exp(g_end[None, :] - tl.cumsum(ww, 0))
        S = S * tl.exp(g_end)[:, None] + _dot(tl.trans(k_e), vv, PS)
    tl.store(s_final + i_sh * K * V + s_offs, S)


@triton.jit
def _pairs(r_in, k_in, r_x, k_x, rr, kk, uu, C: tl.constexpr, PC: tl.constexpr, HALVES: tl.constexpr):
    """M[t, j] = <r_t e^{G_{t-1}-G_j}, k_j> below the diagonal (from r and k scaled by _pair_factors), <r_t, u k_t>
    on it."""
    rows = tl.arange(0, C)
    strict = rows[:, None] > rows[None, :]
    diag = tl.sum(rr * uu[None, :] * kk, 1)
    if HALVES:
        m = tl.where(strict & _same_half(C), _dot(r_in, tl.trans(k_in), PC), 0.0) + _dot(r_x, tl.trans(k_x), PC)
    else:
        m = tl.where(strict, _dot(r_in, tl.trans(k_in), PC), 0.0)
    return m + tl.where(rows[:, None] == rows[None, :], diag[:, None], 0.0)


@triton.jit
def _fwd_out(
    r, w, k, v, u, states, y, chunk_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, SUB: tl.constexpr, PS: tl.constexpr, PC: tl.constexpr,
    W_MIN: tl.constexpr, HALVES: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """y = R~ S_0 + M V for one chunk; with SUB < C also the states at the starts of its SUB-token sub-chunks,
    S_p = diag(e^{G_p}) S_0 + sum_{j<p} (k_j e^{G_p-G_j}) v_j^T, for the gradient kernel (as in WKV7)."""
    i_h, i_t, bos, T, base = _chunk_program(T, H, C, 1, chunk_table, VARLEN)
    if i_t < 0:  # a spare program of a packed-sequence grid
        return
    chunk = base + i_t
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, K)
    cols_v = tl.arange(0, V)
    tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
    p_state = chunk * (C // SUB) * K * V + cols_k[:, None] * V + cols_v[None, :]
    S0 = tl.load(states + p_state).to(tl.float32)
    rr = tl.load(r + pk, mask=live, other=0.0).to(tl.float32)
    ww = _load_log_decay(w, pk, live, W_MIN)
    kk = tl.load(k + pk, mask=live, other=0.0).to(tl.float32)
    vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
    uu = tl.load(u + i_h * K + cols_k).to(tl.float32)
    G = tl.cumsum(ww, 0)
    a_in, b_in, a_x, b_x = _pair_factors(G, ww, C, HALVES)
    m = _pairs(rr * a_in, kk * b_in, rr * a_x, kk * b_x, rr, kk, uu, C, PC, HALVES)
    out = _dot(rr * tl.exp(G - ww), S0, PS) + _dot(m, vv, PC)
    tl.store(y + pv, out.to(y.dtype.element_ty), mask=live)
    for i_sub in tl.static_range(1, C // SUB):
        g_p = _row(G, i_sub * SUB - 1, C)
        k_p = tl.where((rows < i_sub * SUB)[:, None], kk * tl.exp(g_p[None, :] - G), 0.0)
        tl.store(states + p_state + i_sub * K * V, S0 * tl.exp(g_p)[:, None] + _dot(tl.trans(k_p), vv, PS))


@triton.jit
def _bwd_state(
    r, w, dy, ds_final, dstates, ds0, seq_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, SUB: tl.constexpr, PS: tl.constexpr, HAS_DS_FINAL: tl.constexpr, WANT_DS0: tl.constexpr,
    W_MIN: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """dS_0 = diag(e^{G_C}) dS_C + R~^T dY, walking back; stores dS_C of every chunk."""
    i_v = tl.program_id(0)
    i_sh = tl.program_id(1).to(tl.int64)  # sequence x head
    i_h, bos, T, base = _sequence(i_sh, T, H, C, seq_table, VARLEN)
    n_chunks = tl.cdiv(T, C)
    cols_k = tl.arange(0, K)
    cols_v = i_v * BV + tl.arange(0, BV)
    s_offs = cols_k[:, None] * V + cols_v[None, :]
    if HAS_DS_FINAL:
        dS = tl.load(ds_final + i_sh * K * V + s_offs).to(tl.float32)
    else:
        dS = tl.zeros([K, BV], dtype=tl.float32)
    for i_back in range(n_chunks):
        i_t = n_chunks - 1 - i_back
        tl.store(dstates + ((base + i_t + 1) * (C // SUB) - 1) * K * V + s_offs, dS)
        tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
        rr = tl.load(r + pk, mask=live, other=0.0).to(tl.float32)
        ww = _load_log_decay(w, pk, live, W_MIN)
        do = tl.load(dy + pv, mask=live, other=0.0).to(tl.float32)
        r_s = rr * tl.exp(tl.cumsum(ww, 0) - ww)
        dS = dS * tl.exp(tl.sum(ww, 0))[:, None] + _dot(tl.trans(r_s), do, PS)
    if WANT_DS0:
        tl.store(ds0 + i_sh * K * V + s_offs, dS)


@triton.jit
def _bwd_substates(
    r, w, dy, dstates, chunk_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, SUB: tl.constexpr, PS: tl.constexpr,
    W_MIN: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """dL/dS at the ends of a chunk's SUB-token sub-chunks but the last (the walk stores that one): from boundary p,
    dS_p = diag(e^{G_C-G_p}) dS_C + sum_{t>=p} (r_t e^{G_{t-1}-G_p}) dy_t^T."""
    i_h, i_t, bos, T, base = _chunk_program(T, H, C, 1, chunk_table, VARLEN)
    if i_t < 0:  # a spare program of a packed-sequence grid
        return
    chunk = base + i_t
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, K)
    cols_v = tl.arange(0, V)
    tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
    ww = _load_log_decay(w, pk, live, W_MIN)
    rr = tl.load(r + pk, mask=live, other=0.0).to(tl.float32)
    do = tl.load(dy + pv, mask=live, other=0.0).to(tl.float32)
    G = tl.cumsum(ww, 0)
    g_end = tl.sum(ww, 0)
    p_state = chunk * (C // SUB) * K * V + cols_k[:, None] * V + cols_v[None, :]
    dSC = tl.load(dstates + p_state + (C // SUB - 1) * K * V).to(tl.float32)
    for i_sub in tl.static_range(1, C // SUB):
        g_p = _row(G, i_sub * SUB - 1, C)
        r_p = tl.where((rows >= i_sub * SUB)[:, None], rr * tl.exp(G - ww - g_p[None, :]), 0.0)
        dS_p = dSC * tl.exp(g_end - g_p)[:, None] + _dot(tl.trans(r_p), do, PS)
        tl.store(dstates + p_state + (i_sub - 1) * K * V, dS_p)


@triton.jit
def _bwd_chunk(
    r, w, k, v, u, dy, states, dstates,
    dr, dw, dk, dv, du_parts, chunk_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, WALK: tl.constexpr, PS: tl.constexpr, PC: tl.constexpr, ROUND_ONCE: tl.constexpr,
    ROUND_STATES: tl.constexpr, W_MIN: tl.constexpr, HALVES: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """All input gradients of one chunk (du as per-chunk parts). Like WKV7's: each gradient is stored once complete,
    dS_C and S_0 are loaded in turn, the decay gradient is summed from x * dx, ROUND_ONCE rounds operands once
    (ROUND_STATES the states too: not when they are bf16).
    C tokens per program; states and du parts are laid out by the walks' WALK-token chunks (C divides WALK)."""
    i_h, i_t, bos, T, base = _chunk_program(T, H, WALK, WALK // C, chunk_table, VARLEN)
    if i_t < 0:  # a spare program of a packed-sequence grid
        return
    chunk = base * (WALK // C) + i_t
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, K)
    cols_v = tl.arange(0, V)
    tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
    p_state = chunk * K * V + cols_k[:, None] * V + cols_v[None, :]
    ww = _load_log_decay(w, pk, live, W_MIN)
    G = tl.cumsum(ww, 0)  # G_t; G_{t-1} = G - ww
    g_end = tl.sum(ww, 0)
    rr = tl.load(r + pk, mask=live, other=0.0).to(tl.float32)
    kk = tl.load(k + pk, mask=live, other=0.0).to(tl.float32)
    uu = tl.load(u + i_h * K + cols_k).to(tl.float32)
    a_in, b_in, a_x, b_x = _pair_factors(G, ww, C, HALVES)
    r_in = rr * a_in
    k_in = kk * b_in
    r_x = rr * a_x
    k_x = kk * b_x
    k_e = kk * tl.exp(g_end[None, :] - G)
    vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
    do = tl.load(dy + pv, mask=live, other=0.0).to(tl.float32)
    if ROUND_ONCE:
        r_in = _round_to_tf32(r_in)
        k_in = _round_to_tf32(k_in)
        r_x = _round_to_tf32(r_x)
        k_x = _round_to_tf32(k_x)
        k_e = _round_to_tf32(k_e)
        vv = _round_to_tf32(vv)
        do = _round_to_tf32(do)
    strict = rows[:, None] > rows[None, :]
    on_diag = rows[:, None] == rows[None, :]
    m = _pairs(r_in, k_in, r_x, k_x, rr, kk, uu, C, PC, HALVES)
    d_m = _dot(do, tl.trans(vv), PC)
    d_bonus = tl.sum(tl.where(on_diag, d_m, 0.0), 1)[:, None]
    d_m = tl.where(strict, d_m, 0.0)
    # with HALVES, r_in / k_in serve the pairs within a half; those across use r_x / k_x, which are zero outside
    # their half, so their products need no mask
    d_m_in = tl.where(_same_half(C), d_m, 0.0) if HALVES else d_m
    if ROUND_ONCE:
        m = _round_to_tf32(m)
        d_m = _round_to_tf32(d_m)
        d_m_in = _round_to_tf32(d_m_in)
    # du parts [B, H, sub-chunks, K], summed over all but H afterwards; packed, [1, H, the grid's sub-chunks, K]
    # (the scratch index `chunk` interleaves heads per sequence there)
    du_at = i_h * tl.num_programs(0) + tl.program_id(0) if VARLEN else chunk
    tl.store(du_parts + du_at * K + cols_k, tl.sum(d_bonus * rr * kk, 0))
    # the parts that meet dS_C: v, and k through S_C = diag(e^{G_C}) S_0 + K_e^T V
    dSC = tl.load(dstates + p_state).to(tl.float32)
    if ROUND_STATES:
        dSC = _round_to_tf32(dSC)
    d_v = _dot(tl.trans(m), do, PC) + _dot(k_e, dSC, PS)
    tl.store(dv + pv, d_v.to(dv.dtype.element_ty), mask=live)
    d_k_end = _dot(vv, tl.trans(dSC), PS) * tl.exp(g_end[None, :] - G)
    d_k_in = _dot(tl.trans(d_m_in), r_in, PC)
    d_k = d_k_in * b_in + d_k_end + d_bonus * uu[None, :] * rr
    # gradients of G_t (from k), G_{t-1} (from r) and G_C; the reference tokens cancel in every pair. The pair
    # parts take x dx with x as the products saw it (k_in, r_in rounded), so that the two ends of every pair cancel
    # exactly (with kk e^{G_ref - G}: dw 1.12 -> 1.23 times the bf16 floor at 32-token chunks).
    d_gcur = -(kk * d_k_end + d_k_in * k_in)
    if HALVES:
        d_k_x = _dot(tl.trans(d_m), r_x, PC)
        d_k += d_k_x * b_x
        d_gcur -= d_k_x * k_x
    tl.store(dk + pk, d_k.to(dk.dtype.element_ty), mask=live)
    d_gend = tl.sum(kk * d_k_end, 0)
    # the parts that meet S_0: r through y = R~ S_0 + M V
    S0 = tl.load(states + p_state).to(tl.float32)
    d_gend += tl.sum(tl.load(dstates + p_state).to(tl.float32) * S0, 1) * tl.exp(g_end)  # (early, as in WKV7)
    do = tl.load(dy + pv, mask=live, other=0.0).to(tl.float32)
    if ROUND_STATES:
        S0 = _round_to_tf32(S0)
    if ROUND_ONCE:
        do = _round_to_tf32(do)
    d_r_state = _dot(do, tl.trans(S0), PS) * tl.exp(G - ww)
    d_r_in = _dot(d_m_in, k_in, PC)
    d_r = d_r_state + d_r_in * a_in + d_bonus * uu[None, :] * kk
    d_gprev = rr * d_r_state + d_r_in * r_in
    if HALVES:
        d_r_x = _dot(d_m, k_x, PC)
        d_r += d_r_x * a_x
        d_gprev += d_r_x * r_x
    tl.store(dr + pk, d_r.to(dr.dtype.element_ty), mask=live)
    # w_l enters G_t for t >= l, G_{t-1} for t > l, and G_C
    d_w = tl.cumsum(d_gcur + d_gprev, 0, reverse=True) - d_gprev + d_gend[None, :]
    floored = tl.load(w + pk, mask=live, other=0.0).to(tl.float32) < ww
    tl.store(dw + pk, tl.where(floored, 0.0, d_w).to(dw.dtype.element_ty), mask=live)


def _wkv6_layout(r, v, cfg: KernelConfig, cu_seqlens):
    """WKV7's _layout, but a walk program takes all value rows once sequences x heads alone fill the GPU: every
    program recomputes its chunk's decayed keys (H100, 96 and 128 of them: fwd+bwd 2.27 -> 2.13 and 2.67 -> 2.54
    ms)."""
    lay = _layout(r, v, cfg, cu_seqlens)
    return lay._replace(bv=lay.V) if cfg.block_v is None and lay.n_seqs * lay.H >= 96 else lay


def _forward(r, w, k, v, u, s0, cu_seqlens, cfg: KernelConfig, for_grad: bool = True):
    lay = _wkv6_layout(r, v, cfg, cu_seqlens)
    B, T, H, K, V = lay.B, lay.T, lay.H, lay.K, lay.V
    sub = cfg.grad_chunk if for_grad else cfg.chunk
    ps, pc, _ = cfg.precisions()
    w_min = log_decay_floor(cfg)
    saved = _saved_dtype(r, cfg, for_grad)
    states = torch.empty(B, H, lay.n_chunks * (cfg.chunk // sub), K, V, device=r.device, dtype=saved)
    s_final = torch.empty(lay.n_seqs, H, K, V, device=r.device, dtype=torch.float32)
    y = torch.empty_like(v, dtype=r.dtype)
    varlen = dict(VARLEN=lay.packed is not None)
    seq_table, chunk_table = lay.tables()
    _fwd_state[(V // lay.bv, lay.n_seqs * H)](
        w, k, v, s0 if s0 is not None else s_final, states, s_final, seq_table,
        T, H, K, V, lay.bv, cfg.chunk, sub, ps, HAS_S0=s0 is not None, W_MIN=w_min, **varlen,
        num_warps=cfg.warps_seq,
    )  # fmt: skip
    _fwd_out[lay.chunk_grid(cfg.chunk)](
        r, w, k, v, u, states, y, chunk_table, T, H, K, V, cfg.chunk, sub, ps, pc, W_MIN=w_min,
        HALVES=cfg.pair_halves, **varlen, num_warps=cfg.warps_chunk,
    )  # fmt: skip
    return y, s_final, states


class _WKV6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, u, s0, cu_seqlens, cfg):
        y, s_final, states = _forward(r, w, k, v, u, s0, cu_seqlens, cfg)
        ctx.save_for_backward(r, w, k, v, u, states, cu_seqlens)
        ctx.cfg = cfg
        ctx.s0_dtype = None if s0 is None else s0.dtype
        ctx.set_materialize_grads(False)
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        r, w, k, v, u, states, cu_seqlens = ctx.saved_tensors
        cfg = ctx.cfg
        lay = _wkv6_layout(r, v, cfg, cu_seqlens)
        B, T, H, K, V = lay.B, lay.T, lay.H, lay.K, lay.V
        sub = cfg.grad_chunk
        ps, pc, _ = cfg.precisions()
        w_min = log_decay_floor(cfg)
        dy = torch.zeros_like(v, dtype=r.dtype) if dy is None else dy.contiguous()
        want_ds0 = ctx.s0_dtype is not None and ctx.needs_input_grad[5]
        dstates = torch.empty_like(states)
        ds0 = torch.empty(lay.n_seqs, H, K, V, device=r.device, dtype=torch.float32) if want_ds0 else dstates
        varlen = dict(VARLEN=lay.packed is not None)
        seq_table, chunk_table = lay.tables()
        _bwd_state[(V // lay.bv, lay.n_seqs * H)](
            r, w, dy, ds_final.contiguous() if ds_final is not None else dstates, dstates, ds0, seq_table,
            T, H, K, V, lay.bv, cfg.chunk, sub, ps,
            HAS_DS_FINAL=ds_final is not None, WANT_DS0=want_ds0, W_MIN=w_min, **varlen, num_warps=cfg.warps_seq,
        )  # fmt: skip
        if sub < cfg.chunk:
            _bwd_substates[lay.chunk_grid(cfg.chunk)](
                r, w, dy, dstates, chunk_table, T, H, K, V, cfg.chunk, sub, ps, W_MIN=w_min, **varlen,
                num_warps=cfg.warps_chunk,
            )  # fmt: skip
        grads = [torch.empty_like(x) for x in (r, w, k, v)]
        grid = lay.chunk_grid(sub)
        du_rows = lay.n_chunks * (cfg.chunk // sub) if lay.packed is None else grid[0]  # (see _bwd_chunk)
        du_parts = torch.zeros(B, H, du_rows, K, device=r.device, dtype=torch.float32)
        round_once = cfg.round_once and ps == pc == "tf32r"
        ps_c, pc_c = ("tf32", "tf32") if round_once else (ps, pc)
        _bwd_chunk[grid](
            r, w, k, v, u, dy, states, dstates, *grads, du_parts, chunk_table,
            T, H, K, V, sub, cfg.chunk, ps_c, pc_c, round_once, round_once and states.dtype == torch.float32,
            W_MIN=w_min, HALVES=cfg.pair_halves, **varlen,
            num_warps=cfg.warps_grad,
        )  # fmt: skip
        du = du_parts.sum((0, 2)).to(u.dtype)
        ds0 = ds0.to(ctx.s0_dtype) if want_ds0 else None
        return (*grads, du, ds0, None, None)


@torch.compiler.disable  # one opaque call for torch.compile (it cannot trace the launch wrappers)
def wkv6_triton(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    config: KernelConfig | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `rwkvkit.ops.wkv6.wkv6`: [B, T, H, N] inputs, w = log decay, u [H, N_k],
    state [B, H, N_k, N_v] float32; with cu_seqlens, sequences packed into one row [1, T_total, H, N] and states
    [N_seqs, H, N_k, N_v] (`rwkvkit.ops.varlen`). Returns y in r's dtype and the final state in float32; differentiable in all
    inputs and initial_state. Head sizes that are not a power of two in [16, 128] go to the chunked PyTorch path.
    Log decays below log_decay_floor(config) (-14.4 for DEFAULT_CONFIG) are taken as that floor.
    config None: LONG_CHUNK_CONFIG or SHORT_CHUNK_CONFIG where every log decay is at least its log_decay_floor,
    else DEFAULT_CONFIG.
    """
    check_triton_device(r, "WKV kernels", "chunked")
    if config is not None and config.uses_fp16():
        from rwkvkit.errors import ConfigError

        raise ConfigError("KernelConfig precision 'fp16' is a WKV7 option; the WKV6 kernels take 'tf32r' and the rest")
    if cu_seqlens is not None:  # (kept where it is: from the CPU the launches get exact grids)
        check_cu_seqlens(cu_seqlens, r, initial_state)
    tensors = (r, w, k, v, u) + (() if initial_state is None else (initial_state,))
    wants_grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    if config is None:
        config = DEFAULT_CONFIG
        if device_sync_allowed(r):  # the decay check waits for the GPU, so never while a CUDA graph records
            lowest = _lowest_log_decay(w)
            config = next((c for c in (LONG_CHUNK_CONFIG, SHORT_CHUNK_CONFIG) if lowest >= log_decay_floor(c)), config)
    if not _supported(r, v, config):
        from rwkvkit.ops.wkv6 import wkv6

        return wkv6(r, w, k, v, u, initial_state, impl="chunked", cu_seqlens=cu_seqlens)
    r, w, k, v, u = (x.contiguous() for x in (r, w, k, v, u))
    s0 = None if initial_state is None else initial_state.contiguous()
    if wants_grad:
        return _WKV6.apply(r, w, k, v, u, s0, cu_seqlens, config)
    y, s_final, _ = _forward(r, w, k, v, u, s0, cu_seqlens, config, for_grad=False)
    return y, s_final
