"""RWKV-4 WKV in Triton, chunk-parallel: forward and backward, optional initial state, final state out.

The v4 state is per channel: (aa, bb, pp), the numerator and denominator of the weighted average scaled by e^{-pp},
pp being the running max exponent (the official max-subtracted form, exactly as `naive.py` writes it). A walk of
all T tokens per (batch row, block of channels) has only B x C / 32 warps to run (192 at B8 C768) and is bound by
the latency of its steps. So T is cut into CHUNK-token chunks and the walk becomes a three-pass scan:
  1. chunk-parallel: each chunk walked from the empty state gives the state it ends in by itself;
  2. sequential over chunks, one step per chunk: the state at every chunk start, from the one before it. With the
     true (unscaled) numerator A: A_end = e^{n w} A_start + A_chunk over n tokens, and so for the denominator; in
     scaled form that is the max-subtracted sum of the decayed start state and the chunk's own;
  3. chunk-parallel: each chunk walked again from its true start state, writing y.
The forward keeps only the chunk start states for a backward (3 x B x T/CHUNK x C floats): the backward walks the
chunks forward once more from them to get the state after every token, which it needs in reverse order, into a
buffer it drops when done. Keeping those states from the forward instead would cost 12 bytes per channel and token
for every layer until its backward (300 MB per layer at B8 T4096 C768), to save that one walk.
Packed sequences (cu_seqlens) are chunked per sequence through the chunk map the WKV6/WKV7 kernels use
(`rwkvkit.ops.varlen.ChunkMap`): every pass is still one launch.

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

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rwkvkit.ops import check_triton_device
from rwkvkit.ops.varlen import ChunkMap, check_cu_seqlens, chunk_bound, chunk_map
from rwkvkit.ops.wkv7.triton_chunk import _table_row

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
def _token(ptr, pos, C, cols, mask):
    """The channels of token pos (of the flattened batch: [B * T, C]) as float32."""
    return tl.load(ptr + pos * C + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _before(i, n, live):
    """live & (i < n) as a vector (under the CPU interpreter the loop counter i is a plain int)."""
    return live & (tl.zeros_like(live.to(tl.int32)) + i < n)


@triton.jit
def _chunk_program(T, n_chunks, L: tl.constexpr, chunk_table, VARLEN: tl.constexpr):
    """A chunk pass's program: its chunk within its sequence (negative for a spare program of a packed grid), the
    chunk's flat index in the per-chunk scratch, its first token in the flattened batch and its number of tokens
    (the last chunk of a sequence may be short). Grid (chunks per row, B, channel blocks), or packed
    (ChunkMap.n_chunks, 1, channel blocks)."""
    if VARLEN:
        c, bos, length, first = _table_row(chunk_table, tl.program_id(0))
        return c, first.to(tl.int64) + c, bos.to(tl.int64) + c * L, tl.minimum(L, length - c * L)
    else:
        c = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        return c, b * n_chunks + c, b * T + c * L, tl.minimum(L, T - c * L)


@triton.jit
def _sequence(T, n_chunks, L: tl.constexpr, seq_table, VARLEN: tl.constexpr):
    """A carry pass's sequence (a batch row, or a packed sequence): its index, first token in the flattened batch,
    length, first chunk's flat index and number of chunks. Grid (sequences, channel blocks)."""
    i_s = tl.program_id(0).to(tl.int64)
    if VARLEN:
        bos, length, first, _ = _table_row(seq_table, i_s)
        return i_s, bos.to(tl.int64), length, first.to(tl.int64), tl.cdiv(length, L)
    else:
        return i_s, i_s * T, T, i_s * n_chunks, n_chunks


@triton.jit
def _fwd_walk(w_ptr, u_ptr, k_ptr, v_ptr, starts_ptr, ends_ptr, y_ptr, states_ptr, chunk_table, T, C, n_chunks,
              WRITE: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    """One chunk's walk. WRITE "ends" (pass 1): from the empty state, storing only the state it ends in; "y" (pass 3)
    from the chunk's start state, storing y; "states" (for the backward) from the chunk's start state, storing the
    state after every token."""
    c, chunk, start, n = _chunk_program(T, n_chunks, L, chunk_table, VARLEN)
    if c < 0:  # a spare program of a packed grid
        return
    cols, live, w = _channels(tl.program_id(2), w_ptr, C, BLOCK)
    u = tl.load(u_ptr + cols, mask=live, other=0.0).to(tl.float32)
    if WRITE == "ends":
        aa = tl.zeros([BLOCK], dtype=tl.float32)
        bb = tl.zeros([BLOCK], dtype=tl.float32)
        pp = tl.full([BLOCK], EMPTY, dtype=tl.float32)
    else:
        aa, bb, pp = _load_state(starts_ptr + chunk * 3 * C, cols, C, live, EMPTY)
    # each token's loads are issued a token ahead, so the walk does not wait for them
    k_next = _token(k_ptr, start, C, cols, live)
    v_next = _token(v_ptr, start, C, cols, live)
    for i in range(n):
        t = start + i
        kt, vt = k_next, v_next
        ahead = _before(i + 1, n, live)
        k_next = _token(k_ptr, t + 1, C, cols, ahead)
        v_next = _token(v_ptr, t + 1, C, cols, ahead)
        if WRITE == "y":
            q = tl.maximum(pp, u + kt)
            e1 = tl.exp(pp - q)
            e2 = tl.exp(u + kt - q)
            tl.store(y_ptr + t * C + cols, ((e1 * aa + e2 * vt) / (e1 * bb + e2)).to(y_ptr.dtype.element_ty),
                     mask=live)
        q = tl.maximum(pp + w, kt)
        e1 = tl.exp(pp + w - q)
        e2 = tl.exp(kt - q)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = q
        if WRITE == "states":
            _store_state(states_ptr + t * 3 * C, cols, C, live, aa, bb, pp)
    if WRITE == "ends":
        _store_state(ends_ptr + chunk * 3 * C, cols, C, live, aa, bb, pp)


@triton.jit
def _fwd_carry(w_ptr, s0_ptr, ends_ptr, starts_ptr, s_final_ptr, seq_table, T, C, n_chunks,
               HAS_S0: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    """Pass 2: the state at every chunk start (the initial state, then each start decayed over its chunk and summed
    with the chunk's own end state), and the final state."""
    i_s, bos, length, first, count = _sequence(T, n_chunks, L, seq_table, VARLEN)
    cols, live, w = _channels(tl.program_id(1), w_ptr, C, BLOCK)
    aa, bb, pp = _load_state(s0_ptr + i_s * 3 * C, cols, C, live & HAS_S0, EMPTY)  # empty: aa = bb = 0, pp = EMPTY
    at = first * 3 * C
    e_aa, e_bb, e_pp = _load_state(ends_ptr + at, cols, C, _before(0, count, live), EMPTY)
    for i_c in range(count):
        _store_state(starts_ptr + at, cols, C, live, aa, bb, pp)
        c_aa, c_bb, c_pp = e_aa, e_bb, e_pp
        at += 3 * C
        e_aa, e_bb, e_pp = _load_state(ends_ptr + at, cols, C, _before(i_c + 1, count, live), EMPTY)
        decayed = pp + tl.minimum(L, length - i_c * L) * w
        q = tl.maximum(decayed, c_pp)
        e1 = tl.exp(decayed - q)
        e2 = tl.exp(c_pp - q)
        aa = e1 * aa + e2 * c_aa
        bb = e1 * bb + e2 * c_bb
        pp = q
    _store_state(s_final_ptr + i_s * 3 * C, cols, C, live, aa, bb, pp)


@triton.jit
def _bwd_token(k_ptr, v_ptr, dy_ptr, states_ptr, start_ptr, t, start, C, cols, mask):
    """What the backward reads for token t: k, v, dy and the state before it (the state after token t - 1, or the
    chunk's start state for its first token)."""
    kt = _token(k_ptr, t, C, cols, mask)
    vt = _token(v_ptr, t, C, cols, mask)
    dyt = _token(dy_ptr, t, C, cols, mask)
    t_vec = tl.zeros_like(cols) + t  # (a vector mask: see _before)
    inside = mask & (t_vec > start)
    first = mask & (t_vec == start)
    aa_i, bb_i, pp_i = _load_state(states_ptr + (t - 1) * 3 * C, cols, C, inside, 0.0)
    aa_f, bb_f, pp_f = _load_state(start_ptr, cols, C, first, 0.0)
    return kt, vt, dyt, aa_i + aa_f, bb_i + bb_f, pp_i + pp_f


@triton.jit
def _bwd_walk(w_ptr, u_ptr, k_ptr, v_ptr, dy_ptr, starts_ptr, states_ptr, carries_ptr, locals_ptr,
              dk_ptr, dv_ptr, dw_ptr, du_ptr, chunk_table, T, C, n_chunks,
              LOCAL: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    """One chunk walked back. LOCAL (pass 1): from a zero carry, storing the carry it reaches at the chunk start,
    the product of its decays and whether every token kept the running max; else (pass 3) from the carry at the
    chunk's end, storing dk, dv and the chunk's sums of dw and du."""
    c, chunk, start, n = _chunk_program(T, n_chunks, L, chunk_table, VARLEN)
    if c < 0:  # a spare program of a packed grid
        return
    cols, live, w = _channels(tl.program_id(2), w_ptr, C, BLOCK)
    u = tl.load(u_ptr + cols, mask=live, other=0.0).to(tl.float32)
    start_ptr = starts_ptr + chunk * 3 * C
    if LOCAL:
        ga = tl.zeros([BLOCK], dtype=tl.float32)
        gb = tl.zeros([BLOCK], dtype=tl.float32)
        decays = tl.full([BLOCK], 1.0, dtype=tl.float32)
        kept = tl.full([BLOCK], 1.0, dtype=tl.float32)
    else:
        ga, gb, gp = _load_state(carries_ptr + chunk * 3 * C, cols, C, live, 0.0)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        du = tl.zeros([BLOCK], dtype=tl.float32)
    last = start + n - 1
    p_t = tl.load(states_ptr + last * 3 * C + 2 * C + cols, mask=live, other=0.0)
    # loads a token ahead, as in the forward
    k_n, v_n, dy_n, aa_n, bb_n, p_n = _bwd_token(k_ptr, v_ptr, dy_ptr, states_ptr, start_ptr, last, start, C, cols,
                                                 live)
    for i in range(n):
        t = last - i
        kt, vt, dyt, aa_p, bb_p, p_p = k_n, v_n, dy_n, aa_n, bb_n, p_n
        k_n, v_n, dy_n, aa_n, bb_n, p_n = _bwd_token(k_ptr, v_ptr, dy_ptr, states_ptr, start_ptr, t - 1, start, C,
                                                     cols, _before(i + 1, n, live))
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
            tl.store(dk_ptr + t * C + cols, dkt.to(dk_ptr.dtype.element_ty), mask=live)
            tl.store(dv_ptr + t * C + cols, dvt.to(dv_ptr.dtype.element_ty), mask=live)
        ga = ga_p + decay * ga
        gb = gb_p + decay * gb
        p_t = p_p
    if LOCAL:
        at = locals_ptr + chunk * 4 * C + cols
        tl.store(at, ga, mask=live)
        tl.store(at + C, gb, mask=live)
        tl.store(at + 2 * C, decays, mask=live)
        tl.store(at + 3 * C, kept, mask=live)
    else:
        tl.store(dw_ptr + chunk * C + cols, dw, mask=live)
        tl.store(du_ptr + chunk * C + cols, du, mask=live)


@triton.jit
def _bwd_carry(w_ptr, s0_ptr, states_ptr, locals_ptr, ds_final_ptr, carries_ptr, ds0_ptr, seq_table, T, C, n_chunks,
               HAS_S0: tl.constexpr, HAS_DS_FINAL: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr,
               VARLEN: tl.constexpr):
    """Pass 2 of the backward: the carry at every chunk's end, from the final state's gradient back to the first
    chunk; and the initial state's gradient."""
    i_s, bos, length, first, count = _sequence(T, n_chunks, L, seq_table, VARLEN)
    cols, live, _ = _channels(tl.program_id(1), w_ptr, C, BLOCK)
    if HAS_DS_FINAL:
        gaa, gbb, gpp = _load_state(ds_final_ptr + i_s * 3 * C, cols, C, live, 0.0)
        # the final state: after the last token, or for an empty sequence the initial state
        has_tokens = _before(0, length, live)
        aa_T, bb_T, _ = _load_state(states_ptr + (bos + length - 1) * 3 * C, cols, C, has_tokens, 0.0)
        aa_0, bb_0, _ = _load_state(s0_ptr + i_s * 3 * C, cols, C, live & HAS_S0 & (has_tokens == 0), 0.0)
        ga = gaa
        gb = gbb
        gp = gpp - gaa * (aa_T + aa_0) - gbb * (bb_T + bb_0)  # aa_T = a_T e^{-p_T}: p_T also moves aa_T, bb_T
    else:
        ga = tl.zeros([BLOCK], dtype=tl.float32)
        gb = tl.zeros([BLOCK], dtype=tl.float32)
        gp = tl.zeros([BLOCK], dtype=tl.float32)
    at = first + count - 1
    for _ in range(count):
        _store_state(carries_ptr + at * 3 * C, cols, C, live, ga, gb, gp)
        local = locals_ptr + at * 4 * C + cols
        decays = tl.load(local + 2 * C, mask=live, other=0.0)
        ga = tl.load(local, mask=live, other=0.0) + decays * ga
        gb = tl.load(local + C, mask=live, other=0.0) + decays * gb
        gp = tl.where(tl.load(local + 3 * C, mask=live, other=0.0) > 0.0, gp, 0.0)
        at -= 1
    if HAS_S0:  # a_0 = aa_0 e^{pp_0}
        aa0, bb0, _ = _load_state(s0_ptr + i_s * 3 * C, cols, C, live, 0.0)
        _store_state(ds0_ptr + i_s * 3 * C, cols, C, live, ga, gb, gp + ga * aa0 + gb * bb0)


class _Layout(NamedTuple):
    """What the launches need of a call's shapes: batch rows of T tokens, or packed sequences in one row."""

    T: int
    C: int
    n_chunks: int  # chunks per batch row (unused when packed)
    n_seqs: int
    chunk_grid: tuple
    carry_grid: tuple
    packed: ChunkMap | None

    def launch(self) -> dict:
        return dict(L=CHUNK, VARLEN=self.packed is not None)

    def seq_table(self):
        return None if self.packed is None else self.packed.seq_table

    def chunk_table(self):
        return None if self.packed is None else self.packed.chunk_table


def _scratch_rows(B: int, T: int, n_seqs: int, packed: bool) -> int:
    """Rows of the per-chunk scratch tensors: B x chunks per row, or for packed sequences a bound of their chunks
    (the same for any lengths, so that the registered op's fake tensors have the real ones' shapes)."""
    return chunk_bound(T, n_seqs, CHUNK) if packed else B * triton.cdiv(T, CHUNK)


def _layout(k: torch.Tensor, cu_seqlens: torch.Tensor | None) -> _Layout:
    B, T, C = k.shape
    n_chunks = triton.cdiv(T, CHUNK)
    blocks, carry_blocks = triton.cdiv(C, BLOCK), triton.cdiv(C, CARRY_BLOCK)
    if cu_seqlens is None:
        return _Layout(T, C, n_chunks, B, (n_chunks, B, blocks), (B, carry_blocks), None)
    packed = chunk_map(cu_seqlens, T, CHUNK, k.device)
    return _Layout(T, C, n_chunks, packed.n_seqs, (packed.n_chunks, 1, blocks), (packed.n_seqs, carry_blocks), packed)


def _chunk_launch(lay: _Layout) -> dict:
    return lay.launch() | dict(BLOCK=BLOCK, num_warps=BLOCK // 32)


def _carry_launch(lay: _Layout) -> dict:
    return lay.launch() | dict(BLOCK=CARRY_BLOCK, num_warps=1)


def _forward(w, u, k, v, s0, cu_seqlens):
    """y, the final state, and the state at every chunk start (for a backward)."""
    lay = _layout(k, cu_seqlens)
    T, C, n = lay.T, lay.C, lay.n_chunks
    f32 = dict(device=k.device, dtype=torch.float32)
    y = torch.empty_like(k)
    s_final = torch.empty(lay.n_seqs, 3, C, **f32)
    ends = torch.empty(_scratch_rows(k.shape[0], T, lay.n_seqs, lay.packed is not None), 3, C, **f32)
    starts = torch.empty_like(ends)
    table = lay.chunk_table()
    _fwd_walk[lay.chunk_grid](w, u, k, v, starts, ends, y, ends, table, T, C, n, WRITE="ends", **_chunk_launch(lay))
    _fwd_carry[lay.carry_grid](w, s0 if s0 is not None else s_final, ends, starts, s_final, lay.seq_table(), T, C, n,
                               HAS_S0=s0 is not None, **_carry_launch(lay))
    _fwd_walk[lay.chunk_grid](w, u, k, v, starts, ends, y, ends, table, T, C, n, WRITE="y", **_chunk_launch(lay))
    return y, s_final, starts


def _backward(w, u, k, v, s0, starts, dy, ds_final, cu_seqlens):
    lay = _layout(k, cu_seqlens)
    T, C, n = lay.T, lay.C, lay.n_chunks
    f32 = dict(device=k.device, dtype=torch.float32)
    table = lay.chunk_table()
    states = torch.empty(*k.shape[:2], 3, C, **f32)  # the state after every token, walked again from the chunk starts
    _fwd_walk[lay.chunk_grid](w, u, k, v, starts, starts, k, states, table, T, C, n, WRITE="states",  # (no ends, y)
                              **_chunk_launch(lay))
    dy = dy.contiguous()
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # per-chunk sums; zeros where a packed grid's spare programs write nothing
    rows = starts.shape[0]
    dw, du = ((torch.zeros if lay.packed is not None else torch.empty)(rows, C, **f32) for _ in range(2))
    locals_ = torch.empty(rows, 4, C, **f32)
    carried = torch.empty(rows, 3, C, **f32)
    ds0 = torch.empty(lay.n_seqs, 3, C, **f32) if s0 is not None else None
    walk = (w, u, k, v, dy, starts, states, carried, locals_, dk, dv, dw, du, table, T, C, n)
    _bwd_walk[lay.chunk_grid](*walk, LOCAL=True, **_chunk_launch(lay))
    _bwd_carry[lay.carry_grid](
        w, s0 if s0 is not None else states, states, locals_, ds_final.contiguous() if ds_final is not None else states,
        carried, ds0 if ds0 is not None else states, lay.seq_table(), T, C, n,
        HAS_S0=s0 is not None, HAS_DS_FINAL=ds_final is not None, **_carry_launch(lay),
    )  # fmt: skip
    _bwd_walk[lay.chunk_grid](*walk, LOCAL=False, **_chunk_launch(lay))
    return dw.sum(0), du.sum(0), dk, dv, ds0


class _WKV4(torch.autograd.Function):
    """The eager path: the registered op below does the same for torch.compile but costs more host time per call
    (H100 host, fwd+bwd: the kernels themselves take under 1 ms at B8 T4096 C768, so a call is bound by the host)."""

    @staticmethod
    def forward(ctx, w, u, k, v, s0, cu_seqlens):
        y, s_final, starts = _forward(w, u, k, v, s0, cu_seqlens)
        ctx.save_for_backward(w, u, k, v, s0, starts, cu_seqlens)
        ctx.set_materialize_grads(False)
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        w, u, k, v, s0, starts, cu_seqlens = ctx.saved_tensors
        dy = torch.zeros_like(k) if dy is None else dy
        dw, du, dk, dv, ds0 = _backward(w, u, k, v, s0, starts, dy, ds_final, cu_seqlens)
        return dw.to(w.dtype), du.to(u.dtype), dk, dv, ds0, None


# The forward and backward as registered torch ops: torch.compile keeps them as single opaque calls inside its graphs
# (an autograd.Function launching Triton kernels would break the graph around it). Explicit schemas, as for WKV7.
@torch.library.custom_op(
    "rwkvkit::wkv4_fwd", mutates_args=(),
    schema="(Tensor w, Tensor u, Tensor k, Tensor v, Tensor? s0, Tensor? cu_seqlens) -> (Tensor, Tensor, Tensor)",
)
def _wkv4_fwd_op(w, u, k, v, s0, cu_seqlens):
    return _forward(w, u, k, v, s0, cu_seqlens)


@_wkv4_fwd_op.register_fake
def _(w, u, k, v, s0, cu_seqlens):
    B, T, C = k.shape
    n_seqs = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    rows = _scratch_rows(B, T, n_seqs, cu_seqlens is not None)
    return torch.empty_like(k), k.new_empty(n_seqs, 3, C, dtype=torch.float32), \
        k.new_empty(rows, 3, C, dtype=torch.float32)


@torch.library.custom_op(
    "rwkvkit::wkv4_bwd", mutates_args=(),
    schema="(Tensor w, Tensor u, Tensor k, Tensor v, Tensor? s0, Tensor starts, Tensor dy, Tensor? ds_final, "
           "Tensor? cu_seqlens) -> Tensor[]",
)
def _wkv4_bwd_op(w, u, k, v, s0, starts, dy, ds_final, cu_seqlens):
    dw, du, dk, dv, ds0 = _backward(w, u, k, v, s0, starts, dy, ds_final, cu_seqlens)
    return [dw, du, dk, dv] + ([] if ds0 is None else [ds0])


@_wkv4_bwd_op.register_fake
def _(w, u, k, v, s0, starts, dy, ds_final, cu_seqlens):
    f32 = dict(dtype=torch.float32)
    grads = [w.new_empty(w.shape, **f32), u.new_empty(u.shape, **f32), torch.empty_like(k), torch.empty_like(v)]
    return grads + ([] if s0 is None else [s0.new_empty(s0.shape, **f32)])


def _op_setup(ctx, inputs, output):
    w, u, k, v, s0, cu_seqlens = inputs
    ctx.save_for_backward(w, u, k, v, s0, output[2], cu_seqlens)
    ctx.set_materialize_grads(False)  # an unused output (the final state, the chunk starts) gets None


def _op_backward(ctx, dy, ds_final, _d_starts):
    w, u, k, v, s0, starts, cu_seqlens = ctx.saved_tensors
    dy = torch.zeros_like(k) if dy is None else dy
    dw, du, dk, dv, *ds0 = _wkv4_bwd_op(w, u, k, v, s0, starts, dy, ds_final, cu_seqlens)
    return dw.to(w.dtype), du.to(u.dtype), dk, dv, ds0[0] if ds0 else None, None


_wkv4_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def wkv4_triton(w, u, k, v, initial_state=None, cu_seqlens=None):
    """Same contract as `rwkvkit.ops.wkv4.wkv4`: w, u [C], k, v [B, T, C], state [B, 3, C] float32; with cu_seqlens,
    sequences packed into one row [1, T_total, C] and states [N_seqs, 3, C] (`rwkvkit.ops.varlen`)."""
    check_triton_device(k, "WKV kernels", "chunked")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, k, initial_state)
    if k.shape[1] == 0:
        from . import wkv4

        return wkv4(w, u, k, v, initial_state, impl="chunked", cu_seqlens=cu_seqlens)
    w, u, k, v = (x.contiguous() for x in (w, u, k, v))
    s0 = None if initial_state is None else initial_state.float().contiguous()
    if torch.compiler.is_compiling():
        y, s_final, _ = _wkv4_fwd_op(w, u, k, v, s0, cu_seqlens)
        return y, s_final
    tensors = (w, u, k, v) + (() if s0 is None else (s0,))
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return _WKV4.apply(w, u, k, v, s0, cu_seqlens)
    y, s_final, _ = _forward(w, u, k, v, s0, cu_seqlens)
    return y, s_final
