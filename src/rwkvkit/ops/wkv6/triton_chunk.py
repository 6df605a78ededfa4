"""Chunked RWKV-5/6 WKV in Triton: forward and backward, optional initial state, final state out.

Per head, with the state S [N_k, N_v] (key-major) and G_t = w_1 + ... + w_t the in-chunk cumulative log decay, a
chunk of C tokens that starts from S_0 gives

    y_t = (r_t e^{G_{t-1}})^T S_0 + sum_{j<t} <r_t, k_j e^{G_{t-1}-G_j}> v_j + <r_t, u k_t> v_t
    S_C = diag(e^{G_C}) S_0 + sum_j (k_j e^{G_C-G_j}) v_j^T

so y = R~ S_0 + M V with a C x C lower-triangular M (the bonus u on its diagonal). As in the WKV7 kernel, the pair
exponent is split around the chunk's middle token, the sequential walks carry only the state, and the products run
on tensor cores with operands rounded to tf32 (see rwkvkit.ops.wkv7.triton_chunk for the reasons).

RWKV-5/6 decays have no lower bound, and the split around the middle overflows once a channel's log decay summed
over half a chunk falls below -72. The walks' factors (e^{G_C-G_j}, e^{G_{t-1}}) are <= 1 and safe for any decay;
only the chunk-parallel kernels' pairs need care, and only in the chunks that are that steep. So with
`pair_levels` > 0 each of them runs twice, with no wait for the GPU: a first pass takes the chunks where the plain
split fits and flags the others (_flag_if_steep), a second takes the flagged ones and splits their pairs by
halves: those across the halves of a block meet at the lower half's last token, where both factors are <= 1
(exact for any decay), `pair_levels` times over, and those left inside the smallest blocks are split around each
block's middle (`log_decay_floor`: -14.4 for 8-token blocks). The gradient kernel's first pass reads the
forward's flags; its second takes each steep chunk as two 16-token programs with one level less (a 32-token
program with two levels spills 1.2 KB per thread), each making the state or state gradient at the chunk's middle
itself.

Kernels: _fwd_state (sequential: keeps every chunk's S_0), _fwd_out (chunk-parallel), _bwd_state (sequential,
backwards: dL/dS at every chunk end), _bwd_chunk (chunk-parallel: all gradients; du summed afterwards).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rwkvkit.ops import check_triton_device
from rwkvkit.ops.varlen import check_cu_seqlens
from rwkvkit.ops.wkv6 import check_log_decay_shape
from rwkvkit.ops.wkv7.triton_chunk import (
    KernelConfig, _chunk_program, _dot, _layout, _round_to_tf32, _row, _saved_dtype, _sequence,
    _supported, _tile_offsets, log_decay_floor,
)

# The kernels take log decays below log_decay_floor(config) as that floor: at -14.4 (DEFAULT_CONFIG) a channel
# keeps under 6e-7 of its state per token, a change far below the products' tf32 rounding; the decay gradient
# there is 0, as for a clamp (at -8, inputs with many such decays had dw at 2.2x the bf16 error floor).
# 32-token chunks: fewer states to store and load and half the walk steps of 16 (H100, B8 / B4 T4096, fwd+bwd
# with no steep chunk: 1.54 / 1.85 ms against 2.08 / 2.47 for 16-token chunks split by halves throughout).
DEFAULT_CONFIG = KernelConfig(chunk=32, grad_chunk=32, pair_levels=2)


@triton.jit
def _load_log_decay(w, pk, live, i_h, K: tl.constexpr, W_MIN: tl.constexpr, W_CONST: tl.constexpr):
    """A chunk's log decays, floored at W_MIN (log_decay_floor of the config); zero past the sequence's end.
    W_CONST: w is RWKV-5's one log decay per channel for every token, [H, K], where the rows of a [B, T, H, K]
    tensor (float32 in the models: its decays can be within 1e-5 of 1) would be read from memory chunk after chunk
    (H100, fwd+bwd: 1.85 -> 1.57 ms at B8 T4096 H12)."""
    if W_CONST:  # (pk % K: each element's column; loaded as a [C, K] tile, in the layout of the per-token load)
        return tl.maximum(tl.load(w + i_h * K + pk % K, mask=live, other=0.0).to(tl.float32), W_MIN)
    else:
        return tl.maximum(tl.load(w + pk, mask=live, other=0.0).to(tl.float32), W_MIN)


@triton.jit
def _block_ref(G, C: tl.constexpr, BLOCK: tl.constexpr, AT: tl.constexpr):
    """Per row t, the row of G at token AT of t's BLOCK-token block, as a [C, N] tile."""
    rows = tl.arange(0, C)[:, None]
    ref = tl.zeros_like(G)
    for i in tl.static_range(C // BLOCK):
        ref = tl.where(rows // BLOCK == i, _row(G, i * BLOCK + AT, C)[None, :], ref)
    return ref


@triton.jit
def _same_block(C: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, C)
    return (rows[:, None] // BLOCK) == (rows[None, :] // BLOCK)


@triton.jit
def _across_halves(G, ww, C: tl.constexpr, BLOCK: tl.constexpr):
    """The pair weight e^{G_{t-1}-G_j} for t in the upper and j in the lower half of one BLOCK-token block, as
    (e^{G_{t-1}-G_ref}, e^{G_ref-G_j}) around the lower half's last token: both <= 1, zero outside their half."""
    g_ref = _block_ref(G, C, BLOCK, BLOCK // 2 - 1)
    upper = (tl.arange(0, C) % BLOCK >= BLOCK // 2)[:, None]
    return tl.where(upper, tl.exp(G - ww - g_ref), 0.0), tl.where(upper, 0.0, tl.exp(g_ref - G))


@triton.jit
def _pair_factors(G, ww, C: tl.constexpr, LEVELS: tl.constexpr):
    """The in-chunk pair weight e^{G_{t-1}-G_j} (j < t) as products of a t-side and a j-side factor that stay
    finite: (a_in, b_in) around the middle token of each C / 2^LEVELS-token block, for the pairs inside one, and
    with LEVELS >= 1 (a_1, b_1) for the pairs across the chunk's halves, with LEVELS = 2 (a_2, b_2) for those across
    the halves of either half (_across_halves). Unused ones are zeros."""
    LEAF: tl.constexpr = C >> LEVELS
    g_ref = _block_ref(G, C, LEAF, LEAF // 2)
    a_1 = tl.zeros_like(G)
    b_1 = tl.zeros_like(G)
    a_2 = tl.zeros_like(G)
    b_2 = tl.zeros_like(G)
    if LEVELS >= 1:
        a_1, b_1 = _across_halves(G, ww, C, C)
    if LEVELS >= 2:
        a_2, b_2 = _across_halves(G, ww, C, C // 2)
    return tl.exp(G - ww - g_ref), tl.exp(g_ref - G), a_1, b_1, a_2, b_2


@triton.jit
def _flag(flags, PER: tl.constexpr):
    """The flag (see _steep_flags) of this program's chunk, a program of the first pass's grid or one of PER
    programs per chunk."""
    return flags + tl.program_id(0) // PER + tl.program_id(1) * (tl.num_programs(0) // PER)


@triton.jit
def _flag_if_steep(G, ww, flag, C: tl.constexpr):
    """Stores and returns whether the chunk is steep: whether its pair factors without a split (_pair_factors,
    LEVELS 0) would leave e^72, so that the second pass must take it."""
    g_ref = _row(G, C // 2, C)[None, :]
    steep = tl.max(tl.max(tl.maximum(G - ww - g_ref, g_ref - G), 1), 0) > 72.0
    tl.store(flag, steep.to(tl.int8))
    return steep


@triton.jit
def _fwd_state(
    w, k, v, s0, states, s_final, seq_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, SUB: tl.constexpr, PS: tl.constexpr, HAS_S0: tl.constexpr,
    W_MIN: tl.constexpr, W_CONST: tl.constexpr, VARLEN: tl.constexpr,
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
        ww = _load_log_decay(w, pk, live, i_h, K, W_MIN, W_CONST)
        kk = tl.load(k + pk, mask=live, other=0.0).to(tl.float32)
        vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
        g_end = tl.sum(ww, 0)
        k_e = kk * tl.exp(g_end[None, :] - tl.cumsum(ww, 0))
        S = S * tl.exp(g_end)[:, None] + _dot(tl.trans(k_e), vv, PS)
    tl.store(s_final + i_sh * K * V + s_offs, S)


@triton.jit
def _pairs(r_in, k_in, r_1, k_1, r_2, k_2, rr, kk, uu, C: tl.constexpr, PC: tl.constexpr, LEVELS: tl.constexpr):
    """M[t, j] = <r_t e^{G_{t-1}-G_j}, k_j> below the diagonal (from r and k scaled by _pair_factors), <r_t, u k_t>
    on it."""
    rows = tl.arange(0, C)
    strict = rows[:, None] > rows[None, :]
    diag = tl.sum(rr * uu[None, :] * kk, 1)
    m = tl.where(strict & _same_block(C, C >> LEVELS), _dot(r_in, tl.trans(k_in), PC), 0.0)
    if LEVELS >= 1:  # r_1, k_1 are zero outside their halves: no mask
        m += _dot(r_1, tl.trans(k_1), PC)
    if LEVELS >= 2:
        m += tl.where(_same_block(C, C // 2), _dot(r_2, tl.trans(k_2), PC), 0.0)
    return m + tl.where(rows[:, None] == rows[None, :], diag[:, None], 0.0)


@triton.jit
def _fwd_out(
    r, w, k, v, u, states, y, chunk_table, flags,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, SUB: tl.constexpr, PS: tl.constexpr, PC: tl.constexpr,
    W_MIN: tl.constexpr, W_CONST: tl.constexpr, LEVELS: tl.constexpr, PASS: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    """y = R~ S_0 + M V for one chunk; with SUB < C also the states at the starts of its SUB-token sub-chunks,
    S_p = diag(e^{G_p}) S_0 + sum_{j<p} (k_j e^{G_p-G_j}) v_j^T, for the gradient kernel (as in WKV7).
    LEVELS: this launch's pair split (_pair_factors). PASS 0: the only launch, for every chunk; 1: the first of
    two, for the chunks whose factors fit without a split (LEVELS 0), which flags the others (_flag_if_steep);
    2: the second, for the flagged ones."""
    i_h, i_t, bos, T, base = _chunk_program(T, H, C, 1, chunk_table, VARLEN)
    if i_t < 0:  # a spare program of a packed-sequence grid
        return
    chunk = base + i_t
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, K)
    cols_v = tl.arange(0, V)
    tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
    if PASS == 2:
        if tl.load(_flag(flags, 1)) == 0:  # taken by the first pass
            return
    ww = _load_log_decay(w, pk, live, i_h, K, W_MIN, W_CONST)
    G = tl.cumsum(ww, 0)
    if PASS == 1:
        if _flag_if_steep(G, ww, _flag(flags, 1), C):
            return
    p_state = chunk * (C // SUB) * K * V + cols_k[:, None] * V + cols_v[None, :]
    S0 = tl.load(states + p_state).to(tl.float32)
    rr = tl.load(r + pk, mask=live, other=0.0).to(tl.float32)
    kk = tl.load(k + pk, mask=live, other=0.0).to(tl.float32)
    vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
    uu = tl.load(u + i_h * K + cols_k).to(tl.float32)
    a_in, b_in, a_1, b_1, a_2, b_2 = _pair_factors(G, ww, C, LEVELS)
    m = _pairs(rr * a_in, kk * b_in, rr * a_1, kk * b_1, rr * a_2, kk * b_2, rr, kk, uu, C, PC, LEVELS)
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
    W_MIN: tl.constexpr, W_CONST: tl.constexpr, VARLEN: tl.constexpr,
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
        ww = _load_log_decay(w, pk, live, i_h, K, W_MIN, W_CONST)
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
    W_MIN: tl.constexpr, W_CONST: tl.constexpr, VARLEN: tl.constexpr,
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
    ww = _load_log_decay(w, pk, live, i_h, K, W_MIN, W_CONST)
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
def _state_at_half(w, k, v, states, p_walk, i_t, bos, T, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   C: tl.constexpr, PREC: tl.constexpr, W_MIN: tl.constexpr, W_CONST: tl.constexpr):
    """S at the middle of a 2C-token walk chunk from its S_0, for the program on its second half (i_t):
    diag(e^{G_C}) S_0 + sum_{j<C} (k_j e^{G_C-G_j}) v_j^T over the first half."""
    tok, live, pk, pv = _tile_offsets(i_t - 1, bos, T, i_h, H, K, V, C, tl.arange(0, V))
    ww = _load_log_decay(w, pk, live, i_h, K, W_MIN, W_CONST)
    g_end = tl.sum(ww, 0)
    k_e = tl.load(k + pk, mask=live, other=0.0).to(tl.float32) * tl.exp(g_end[None, :] - tl.cumsum(ww, 0))
    vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
    return tl.load(states + p_walk).to(tl.float32) * tl.exp(g_end)[:, None] + _dot(tl.trans(k_e), vv, PREC)


@triton.jit
def _state_grad_at_half(r, w, dy, dstates, p_walk, i_t, bos, T, i_h, H: tl.constexpr, K: tl.constexpr,
                        V: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr, W_MIN: tl.constexpr,
                        W_CONST: tl.constexpr):
    """dL/dS at the middle of a 2C-token walk chunk from the dS at its end, for the program on its first half
    (i_t): diag(e^{G_2C-G_C}) dS_2C + sum_{t>=C} (r_t e^{G_{t-1}-G_C}) dy_t^T over the second half."""
    tok, live, pk, pv = _tile_offsets(i_t + 1, bos, T, i_h, H, K, V, C, tl.arange(0, V))
    ww = _load_log_decay(w, pk, live, i_h, K, W_MIN, W_CONST)
    r_s = tl.load(r + pk, mask=live, other=0.0).to(tl.float32) * tl.exp(tl.cumsum(ww, 0) - ww)
    do = tl.load(dy + pv, mask=live, other=0.0).to(tl.float32)
    return tl.load(dstates + p_walk).to(tl.float32) * tl.exp(tl.sum(ww, 0))[:, None] + _dot(tl.trans(r_s), do, PREC)


@triton.jit
def _bwd_chunk(
    r, w, k, v, u, dy, states, dstates,
    dr, dw, dk, dv, du_parts, chunk_table, flags,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, WALK: tl.constexpr, PS: tl.constexpr, PC: tl.constexpr, ROUND_ONCE: tl.constexpr,
    ROUND_STATES: tl.constexpr, W_MIN: tl.constexpr, W_CONST: tl.constexpr, LEVELS: tl.constexpr,
    PASS: tl.constexpr, HALVES: tl.constexpr, DU_SPREAD: tl.constexpr, FLAGGED: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """All input gradients of one chunk (du as per-chunk parts). Like WKV7's: each gradient is stored once complete,
    dS_C and S_0 are loaded in turn, the decay gradient is summed from x * dx, ROUND_ONCE rounds operands once
    (ROUND_STATES the states too: not when they are bf16). LEVELS and PASS as in _fwd_out.
    C tokens per program; states and du parts are laid out by the walks' WALK-token chunks (C divides WALK), or
    with HALVES by chunks of 2C tokens with one state each: the program on either half makes the state (gradient)
    at the middle itself (the second pass over steep chunks; 16-token programs spill less than 32-token ones).
    DU_SPREAD 2: du parts at every other row (a first pass whose second takes halves). FLAGGED: the first pass
    reads the flags that the forward's first pass wrote for the same chunks instead of checking the decays again."""
    i_h, i_t, bos, T, base = _chunk_program(T, H, WALK, WALK // C, chunk_table, VARLEN)
    if i_t < 0:  # a spare program of a packed-sequence grid
        return
    chunk = base * (WALK // C) + i_t
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, K)
    cols_v = tl.arange(0, V)
    tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
    p_state = chunk * K * V + cols_k[:, None] * V + cols_v[None, :]
    if HALVES:
        if i_t * C >= T:  # the second half of a sequence's last chunk when that chunk has no such half
            return
        p_walk = (base + i_t // 2) * K * V + cols_k[:, None] * V + cols_v[None, :]
    if PASS == 2:
        if tl.load(_flag(flags, 2 if HALVES else 1)) == 0:  # taken by the first pass
            return
    if PASS == 1 and FLAGGED:
        if tl.load(_flag(flags, 1)) != 0:  # left to the second pass
            return
    ww = _load_log_decay(w, pk, live, i_h, K, W_MIN, W_CONST)
    G = tl.cumsum(ww, 0)  # G_t; G_{t-1} = G - ww
    g_end = tl.sum(ww, 0)
    if PASS == 1 and not FLAGGED:
        if _flag_if_steep(G, ww, _flag(flags, 1), C):
            return
    rr = tl.load(r + pk, mask=live, other=0.0).to(tl.float32)
    kk = tl.load(k + pk, mask=live, other=0.0).to(tl.float32)
    uu = tl.load(u + i_h * K + cols_k).to(tl.float32)
    a_in, b_in, a_1, b_1, a_2, b_2 = _pair_factors(G, ww, C, LEVELS)
    r_in = rr * a_in
    k_in = kk * b_in
    r_1 = rr * a_1
    k_1 = kk * b_1
    r_2 = rr * a_2
    k_2 = kk * b_2
    k_e = kk * tl.exp(g_end[None, :] - G)
    vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
    do = tl.load(dy + pv, mask=live, other=0.0).to(tl.float32)
    if ROUND_ONCE:
        r_in = _round_to_tf32(r_in)
        k_in = _round_to_tf32(k_in)
        r_1 = _round_to_tf32(r_1)
        k_1 = _round_to_tf32(k_1)
        r_2 = _round_to_tf32(r_2)
        k_2 = _round_to_tf32(k_2)
        k_e = _round_to_tf32(k_e)
        vv = _round_to_tf32(vv)
        do = _round_to_tf32(do)
    strict = rows[:, None] > rows[None, :]
    on_diag = rows[:, None] == rows[None, :]
    m = _pairs(r_in, k_in, r_1, k_1, r_2, k_2, rr, kk, uu, C, PC, LEVELS)
    d_m = _dot(do, tl.trans(vv), PC)
    d_bonus = tl.sum(tl.where(on_diag, d_m, 0.0), 1)[:, None]
    d_m = tl.where(strict, d_m, 0.0)
    # with LEVELS, r_in / k_in serve the pairs inside the smallest blocks, r_1 / k_1 those across the chunk's
    # halves (zero outside their half: no mask), r_2 / k_2 those across the halves of either half
    d_m_in = tl.where(_same_block(C, C >> LEVELS), d_m, 0.0) if LEVELS else d_m
    d_m_2 = tl.where(_same_block(C, C // 2), d_m, 0.0) if LEVELS >= 2 else d_m
    if ROUND_ONCE:
        m = _round_to_tf32(m)
        d_m = _round_to_tf32(d_m)
        d_m_in = _round_to_tf32(d_m_in)
        d_m_2 = _round_to_tf32(d_m_2)
    # du parts [B, H, sub-chunks, K], summed over all but H afterwards; packed, [1, H, the grid's sub-chunks, K]
    # (the scratch index `chunk` interleaves heads per sequence there)
    du_at = (i_h * tl.num_programs(0) + tl.program_id(0) if VARLEN else chunk) * DU_SPREAD
    tl.store(du_parts + du_at * K + cols_k, tl.sum(d_bonus * rr * kk, 0))
    # the parts that meet dS_C: v, and k through S_C = diag(e^{G_C}) S_0 + K_e^T V
    if HALVES:
        if i_t % 2 == 0:
            dSC = _state_grad_at_half(r, w, dy, dstates, p_walk, i_t, bos, T, i_h, H, K, V, C,
                                      "tf32r" if ROUND_ONCE else PS, W_MIN, W_CONST)
        else:
            dSC = tl.load(dstates + p_walk).to(tl.float32)
    else:
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
    if LEVELS >= 1:
        d_k_1 = _dot(tl.trans(d_m), r_1, PC)
        d_k += d_k_1 * b_1
        d_gcur -= d_k_1 * k_1
    if LEVELS >= 2:
        d_k_2 = _dot(tl.trans(d_m_2), r_2, PC)
        d_k += d_k_2 * b_2
        d_gcur -= d_k_2 * k_2
    tl.store(dk + pk, d_k.to(dk.dtype.element_ty), mask=live)
    d_gend = tl.sum(kk * d_k_end, 0)
    # the parts that meet S_0: r through y = R~ S_0 + M V
    if HALVES:
        if i_t % 2 == 0:
            S0 = tl.load(states + p_walk).to(tl.float32)
        else:
            S0 = _state_at_half(w, k, v, states, p_walk, i_t, bos, T, i_h, H, K, V, C,
                                "tf32r" if ROUND_ONCE else PS, W_MIN, W_CONST)
        d_gend += tl.sum(dSC * S0, 1) * tl.exp(g_end)
    else:
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
    if LEVELS >= 1:
        d_r_1 = _dot(d_m, k_1, PC)
        d_r += d_r_1 * a_1
        d_gprev += d_r_1 * r_1
    if LEVELS >= 2:
        d_r_2 = _dot(d_m_2, k_2, PC)
        d_r += d_r_2 * a_2
        d_gprev += d_r_2 * r_2
    tl.store(dr + pk, d_r.to(dr.dtype.element_ty), mask=live)
    # w_l enters G_t for t >= l, G_{t-1} for t > l, and G_C
    d_w = tl.cumsum(d_gcur + d_gprev, 0, reverse=True) - d_gprev + d_gend[None, :]
    if W_CONST:  # dw parts, laid out as du's
        floored = tl.load(w + i_h * K + cols_k).to(tl.float32) < W_MIN
        tl.store(dw + du_at * K + cols_k, tl.where(floored, 0.0, tl.sum(tl.where(live, d_w, 0.0), 0)))
    else:
        floored = tl.load(w + pk, mask=live, other=0.0).to(tl.float32) < ww
        tl.store(dw + pk, tl.where(floored, 0.0, d_w).to(dw.dtype.element_ty), mask=live)


def _wkv6_layout(r, v, cfg: KernelConfig, cu_seqlens):
    """WKV7's _layout, but a walk program takes all value rows once sequences x heads alone fill the GPU: every
    program recomputes its chunk's decayed keys (H100, 96 and 128 of them: fwd+bwd 2.27 -> 2.13 and 2.67 -> 2.54
    ms)."""
    lay = _layout(r, v, cfg, cu_seqlens)
    return lay._replace(bv=lay.whole_head_rows(cfg))


def _passes(cfg: KernelConfig, tokens: int) -> tuple[tuple[int, int], ...]:
    """(LEVELS, PASS) of each launch of a chunk-parallel kernel of `tokens` per program (see _fwd_out); the second
    splits down to blocks of chunk / 2^pair_levels tokens whatever the kernel's chunk."""
    if cfg.pair_levels == 0:
        return ((0, 0),)
    return (0, 1), (max(0, cfg.pair_levels - (cfg.chunk // tokens).bit_length() + 1), 2)


def _steep_flags(grid: tuple[int, int], device) -> torch.Tensor:
    """Written by the first pass of a chunk-parallel kernel, one per program: 1 where its chunk is steep (left to
    the second pass), 0 where the first pass took it (a hook for tests)."""
    return torch.empty(grid[0] * grid[1], device=device, dtype=torch.int8)


def _decay_args(w: torch.Tensor, cfg: KernelConfig) -> dict:
    """The kernels' decay constexprs: the floor, and whether w is RWKV-5's time-constant [H, N] form."""
    return dict(W_MIN=log_decay_floor(cfg), W_CONST=w.dim() == 2)


def _forward(r, w, k, v, u, s0, cu_seqlens, cfg: KernelConfig, for_grad: bool = True):
    lay = _wkv6_layout(r, v, cfg, cu_seqlens)
    B, T, H, K, V = lay.B, lay.T, lay.H, lay.K, lay.V
    sub = cfg.grad_chunk if for_grad else cfg.chunk
    ps, pc, _ = cfg.precisions()
    decay = _decay_args(w, cfg)
    saved = _saved_dtype(r, cfg, for_grad)
    states = torch.empty(B, H, lay.n_chunks * (cfg.chunk // sub), K, V, device=r.device, dtype=saved)
    s_final = torch.empty(lay.n_seqs, H, K, V, device=r.device, dtype=torch.float32)
    y = torch.empty_like(v, dtype=r.dtype)
    varlen = dict(VARLEN=lay.packed is not None)
    seq_table, chunk_table = lay.tables()
    _fwd_state[(V // lay.bv, lay.n_seqs * H)](
        w, k, v, s0 if s0 is not None else s_final, states, s_final, seq_table,
        T, H, K, V, lay.bv, cfg.chunk, sub, ps, HAS_S0=s0 is not None, **decay, **varlen,
        num_warps=cfg.warps_seq,
    )  # fmt: skip
    grid = lay.chunk_grid(cfg.chunk)
    flags = _steep_flags(grid, r.device)
    for levels, pass_ in _passes(cfg, cfg.chunk):
        _fwd_out[grid](
            r, w, k, v, u, states, y, chunk_table, flags, T, H, K, V, cfg.chunk, sub, ps, pc, **decay,
            LEVELS=levels, PASS=pass_, **varlen, num_warps=cfg.warps_chunk,
        )  # fmt: skip
    return y, s_final, states, flags


class _WKV6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, u, s0, cu_seqlens, cfg):
        y, s_final, states, flags = _forward(r, w, k, v, u, s0, cu_seqlens, cfg)
        ctx.save_for_backward(r, w, k, v, u, states, flags, cu_seqlens)
        ctx.cfg = cfg
        ctx.s0_dtype = None if s0 is None else s0.dtype
        ctx.set_materialize_grads(False)
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        r, w, k, v, u, states, fwd_flags, cu_seqlens = ctx.saved_tensors
        cfg = ctx.cfg
        lay = _wkv6_layout(r, v, cfg, cu_seqlens)
        B, T, H, K, V = lay.B, lay.T, lay.H, lay.K, lay.V
        sub = cfg.grad_chunk
        ps, pc, _ = cfg.precisions()
        decay = _decay_args(w, cfg)
        dy = torch.zeros_like(v, dtype=r.dtype) if dy is None else dy.contiguous()
        want_ds0 = ctx.s0_dtype is not None and ctx.needs_input_grad[5]
        dstates = torch.empty_like(states)
        ds0 = torch.empty(lay.n_seqs, H, K, V, device=r.device, dtype=torch.float32) if want_ds0 else dstates
        varlen = dict(VARLEN=lay.packed is not None)
        seq_table, chunk_table = lay.tables()
        _bwd_state[(V // lay.bv, lay.n_seqs * H)](
            r, w, dy, ds_final.contiguous() if ds_final is not None else dstates, dstates, ds0, seq_table,
            T, H, K, V, lay.bv, cfg.chunk, sub, ps,
            HAS_DS_FINAL=ds_final is not None, WANT_DS0=want_ds0, **decay, **varlen, num_warps=cfg.warps_seq,
        )  # fmt: skip
        if sub < cfg.chunk:
            _bwd_substates[lay.chunk_grid(cfg.chunk)](
                r, w, dy, dstates, chunk_table, T, H, K, V, cfg.chunk, sub, ps, **decay, **varlen,
                num_warps=cfg.warps_chunk,
            )  # fmt: skip
        grid = lay.chunk_grid(sub)
        # the second pass takes the steep chunks of 32 tokens or more in halves (_bwd_chunk's HALVES): with two
        # levels of splits, 32-token programs spill 1.2 KB per thread
        halves = cfg.pair_levels > 0 and sub == cfg.chunk >= 32
        spread = 2 if halves else 1
        du_rows = (lay.n_chunks * (cfg.chunk // sub) if lay.packed is None else grid[0]) * spread  # (see _bwd_chunk)
        du_parts = torch.zeros(B, H, du_rows, K, device=r.device, dtype=torch.float32)
        # a time-constant w (RWKV-5) gets its gradient in parts as u does
        grads = [torch.zeros_like(du_parts) if x is w and decay["W_CONST"] else torch.empty_like(x)
                 for x in (r, w, k, v)]
        round_once = cfg.round_once and ps == pc == "tf32r"
        ps_c, pc_c = ("tf32", "tf32") if round_once else (ps, pc)
        # the forward's first pass flagged the same chunks when the gradient kernel takes the walks' chunks
        flagged = sub == cfg.chunk
        flags = fwd_flags if flagged else _steep_flags(grid, r.device)
        for levels, pass_ in _passes(cfg, sub):
            by_halves = halves and pass_ == 2
            _bwd_chunk[(grid[0] * 2, grid[1]) if by_halves else grid](
                r, w, k, v, u, dy, states, dstates, *grads, du_parts, chunk_table, flags,
                T, H, K, V, sub // 2 if by_halves else sub, cfg.chunk, ps_c, pc_c, round_once,
                round_once and (by_halves or states.dtype == torch.float32), **decay,
                LEVELS=max(0, levels - 1) if by_halves else levels, PASS=pass_, HALVES=by_halves,
                DU_SPREAD=1 if by_halves else spread, FLAGGED=flagged, **varlen, num_warps=cfg.warps_grad,
            )  # fmt: skip
        du = du_parts.sum((0, 2)).to(u.dtype)
        if decay["W_CONST"]:
            grads[1] = grads[1].sum((0, 2)).to(w.dtype)
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
    """Same contract as `rwkvkit.ops.wkv6.wkv6`: [B, T, H, N] inputs, w = log decay ([B, T, H, N], or [H, N] for
    RWKV-5's time-constant one), u [H, N_k], state [B, H, N_k, N_v] float32; with cu_seqlens, sequences packed into
    one row [1, T_total, H, N] and states [N_seqs, H, N_k, N_v] (`rwkvkit.ops.varlen`). Returns y in r's dtype and
    the final state in float32; differentiable in all inputs and initial_state. Head sizes that are not a power of
    two in [16, 128] go to the chunked PyTorch path.
    Log decays below log_decay_floor(config) (-14.4 for DEFAULT_CONFIG, the config for None) are taken as that
    floor.
    """
    check_triton_device(r, "WKV kernels", "chunked")
    check_log_decay_shape(r, w)
    if config is not None and config.uses_fp16():
        from rwkvkit.errors import ConfigError

        raise ConfigError("KernelConfig precision 'fp16' is a WKV7 option; the WKV6 kernels take 'tf32r' and the rest")
    if config is not None and config.pair_levels not in (0, 1, 2):
        from rwkvkit.errors import ConfigError

        raise ConfigError(f"KernelConfig.pair_levels takes 0, 1 or 2, got {config.pair_levels}")
    if cu_seqlens is not None:  # (kept where it is: from the CPU the launches get exact grids)
        check_cu_seqlens(cu_seqlens, r, initial_state)
    tensors = (r, w, k, v, u) + (() if initial_state is None else (initial_state,))
    wants_grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    config = DEFAULT_CONFIG if config is None else config
    if not _supported(r, v, config):
        from rwkvkit.ops.wkv6 import wkv6

        return wkv6(r, w, k, v, u, initial_state, impl="chunked", cu_seqlens=cu_seqlens)
    r, w, k, v, u = (x.contiguous() for x in (r, w, k, v, u))
    s0 = None if initial_state is None else initial_state.contiguous()
    if wants_grad:
        return _WKV6.apply(r, w, k, v, u, s0, cu_seqlens, config)
    y, s_final, *_ = _forward(r, w, k, v, u, s0, cu_seqlens, config, for_grad=False)
    return y, s_final
