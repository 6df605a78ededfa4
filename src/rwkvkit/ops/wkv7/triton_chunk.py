"""Chunked RWKV-7 WKV in Triton: forward and backward, optional initial state, final state out.

Per head, with the state S [N_v, N_k] (value-major) and G_t = w_1 + ... + w_t the in-chunk cumulative log decay,
the recurrence S_t = S_{t-1} diag(e^{w_t}) + (S_{t-1} a_t) b_t^T + v_t k_t^T over a chunk of C tokens that starts
from S_0 has a closed form. With u_t = S_{t-1} a_t (the "removal" vector, [N_v]):

    u_t = S_0 (a_t e^{G_{t-1}}) + sum_{j<t}  u_j <a_t, b_j e^{G_{t-1}-G_j}> + v_j <a_t, k_j e^{G_{t-1}-G_j}>
    y_t = S_0 (r_t e^{G_t})     + sum_{j<=t} u_j <r_t, b_j e^{G_t-G_j}>     + v_j <r_t, k_j e^{G_t-G_j}>
    S_C = S_0 diag(e^{G_C})     + sum_j (u_j b_j^T + v_j k_j^T) diag(e^{G_C-G_j})

The first line is a unit lower-triangular system, U = (I - M_ab)^{-1} (A~ S_0^T + M_ak V), solved with the product
(I + L)(I + L^2)(I + L^4)... of the strictly lower (hence nilpotent) L = M_ab. Everything else is small matrix
products, so a chunk costs a handful of tl.dot calls and only the chunk-to-chunk state walk is sequential.

The pair exponent e^{G_t - G_j} is split as e^{G_t - G_m} e^{G_m - G_j} around the chunk's middle token m, so the
factors stay finite while the log decay summed over half a chunk stays above about -80 (RWKV-7 models have
w >= -e^{-0.5} per token, i.e. above -10 over the 16 tokens of half a 32-token chunk). Loads, exponentials and
accumulation are float32; by default the products run on tensor cores with operands rounded to tf32 (KernelConfig
says how to change that).

Kernels, "chunk-parallel" ones with one program per (chunk, batch*head), "sequential" ones with one program per
(value block, batch*head) walking the chunks with the state in registers:
  _fwd_prep  (chunk-parallel) the state-free parts of U: wa = solve A~ and uv = solve M_ak V; the decayed keys
                              B_e, K_e and e^{G_C} the walk needs; for a backward, the solve itself (it is
                              [C, C] per chunk: loading it took _bwd_prep from 0.40 to 0.34 ms, H100, 0.1B shape)
  _fwd_state (sequential)     U = uv + wa S_0^T and the next state; keeps every chunk's S_0 and U for later
  _fwd_out   (chunk-parallel) y from S_0, U and the in-chunk pairs; the states at the gradient sub-chunk starts
  _bwd_prep  (chunk-parallel) the state-free parts of dW = solve^T dU (the forward's solve); R~, A~, e^{G_C}
  _bwd_state (sequential)     dW and dL/dS at every chunk end and sub-chunk boundary (and dL/dS_0), walking back
  _bwd_chunk (chunk-parallel) all input gradients of a sub-chunk from its S_0, dS_C, U and dW
The walks are the sequential part, so everything in them that does not need the state is done before, in the
chunk-parallel kernels: they load decayed operands instead of raw inputs (H100, 0.1B shape: the forward
walk 0.60 -> 0.41 ms).
The gradient kernel works on sub-chunks (`grad_chunk`, 16 tokens) of the walks' chunks (`chunk`, 32): u_t and its
gradient dW_t do not depend on the chunking, so only the states at the sub-chunk boundaries are needed extra.
Padding tokens past T load as zeros (w = 0: decay 1, no update), so a partial last chunk needs no special case.
With 16-bit inputs the states at the sub-chunk starts that the forward keeps for the backward, and the state
gradients there, are stored in bf16 (`half_saved_states`; the walks still carry float32): they are most of the
backward's memory traffic (two [N, N] tiles per 16 tokens and head against six [16, N] inputs), and halving them
cost 1.05 -> 1.12x the bf16 error floor (H100, 0.1B shape: fwd+bwd 3.77 -> 3.53 ms; WKV6, which shares the
option: 1.02 -> 1.08x, 6-9% faster). A call without gradients keeps float32 states.
The decayed inputs the walks load (B e^{G_C-G}, K e^{G_C-G} forward, R e^{G}, A e^{G-w} backward) are fp16 with
16-bit inputs (`half_walk_operands`): each is its input times a factor <= 1, and fp16 keeps the 10-bit mantissa
that the walks' tf32-rounded products keep anyway, so only values under fp16's normal range (6e-5, tiny next to
the chunk's later tokens) lose digits. Inputs above 65504 in size (bf16 only) would overflow: turn it off for
those. H100, 0.1B shape: fwd+bwd 3.45 -> 3.38 ms, the walks 0.39 -> 0.36 and 0.54 -> 0.53 ms, errors unchanged.
The default config's products take fp16 operands ("fp16" precisions) where that is safe (`fp16_operands_fit`:
16-bit inputs and a known decay bound, which RWKV-7 models pass): fp16 rounds to the same 10-bit mantissa as
"tf32r", so the errors do not move, but it takes half the registers and shared memory and twice the tensor-core
rate (H100: fwd+bwd 3.29 -> 2.85 ms at the 0.1B shape, 4.17 -> 3.57 ms at 1.5B). Its range (6e-5 to 65504) asks
three things: gradients are scaled by a power of two per call (`_scale`), however small the loss makes them, and
a backward with a final-state gradient, which can decay far below the largest |dy|, keeps "tf32r" (and so
does the walk of one that wants dL/dS_0, which decays the same way through a loss-masked prompt); the
pair factors of the walks' chunks span up to C/2 + 1 tokens (2^15 at RWKV-7's steepest decay), so the inputs of
those pair matrices are scaled to a largest element in [1, 2) per chunk first (`_chunk_pair_matrix`); the gradient
kernel's pair factors span 9 tokens (2^8 at that decay) on unscaled inputs, so there r, k, a, b must stay under
about 256 in size, and everywhere the states, U and v under 65504 (turn "fp16" off for inputs beyond that).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rwkvkit.ops import WHOLE_HEAD_WALKS, check_triton_device, device_sync_allowed, walk_block_v
from rwkvkit.ops.varlen import ChunkMap, check_cu_seqlens, chunk_bound, chunk_map


class KernelConfig(NamedTuple):
    """Tuning knobs. A precision is how tl.dot treats float32 operands: "ieee" (exact float32, slow on the GPU),
    "tf32r" (operands rounded to tf32, then tensor cores), "tf32" (tensor cores on truncated operands), "tf32x3",
    or "fp16" (WKV7 only: operands rounded to fp16, see the module doc; where fp16 is not safe, "tf32r" instead),
    set separately for the products with the state (or its gradient), the other in-chunk products, and the solve."""

    chunk: int = 16  # tokens per chunk of the walks, the preparation and the output (power of two >= 16)
    grad_chunk: int = 16  # tokens per program of the gradient kernel (power of two, 16 <= grad_chunk <= chunk)
    precision_state: str = "tf32r"
    precision_chunk: str = "tf32r"
    precision_solve: str = "tf32r"
    block_v: int | None = None  # value rows per program in the sequential walks (None: ops.walk_block_v's rule)
    warps_seq: int = 4
    warps_chunk: int = 4
    warps_grad: int = 4  # _bwd_chunk, WKV7 and WKV6 (two programs per SM; 8 warps measured 1.2-1.6x slower)
    round_once: bool = True  # tf32r in the gradient kernel: round each operand once, not in every product
    stages_seq: int | None = None  # WKV7 walks' pipelining stages (None: Triton's; 1-4 measured alike, H100)
    pair_levels: int = 0  # WKV6, 0-2: chunks too steep for one split around the middle token halve it this often
    half_saved_states: bool = True  # 16-bit inputs: the states and state gradients at the gradient sub-chunk
    # starts, which the forward saves for the backward, are kept in bf16 (WKV7 and WKV6; see module doc)
    half_walk_operands: bool = True  # WKV7, 16-bit inputs: the decayed inputs the walks load are fp16 (module doc)

    def precisions(self, fp16: bool = True) -> tuple[str, str, str]:
        """The three precisions, with "fp16" read as "tf32r" unless fp16 (fp16 operands are safe for the call)."""
        return tuple("tf32r" if p == "fp16" and not fp16 else p
                     for p in (self.precision_state, self.precision_chunk, self.precision_solve))

    def uses_fp16(self) -> bool:
        return "fp16" in (self.precision_state, self.precision_chunk, self.precision_solve)


# 32-token walks (half the sequential steps of 16) with the gradient kernel on 16-token sub-chunks (at 32 it spills).
# H100, B8 T4096 H12: fwd 1.43 -> 1.22 ms, fwd+bwd 4.13 -> 4.04 against chunk 16. fp16 operands where safe.
DEFAULT_CONFIG = KernelConfig(chunk=32, grad_chunk=16, precision_state="fp16", precision_chunk="fp16",
                              precision_solve="fp16")


@triton.jit
def _round_to_tf32(x):
    """Round float32 to the nearest tf32 (10-bit mantissa, ties away from zero) by bit arithmetic."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(x, y, PREC: tl.constexpr):
    """tl.dot of float32 tiles; "tf32r" rounds the operands to tf32 first, since the tensor cores truncate them
    (a bias that measured 1.8x the bf16 error floor in da and db, against about 1.1x with rounding); "fp16" rounds
    them to fp16 (float32 accumulation either way)."""
    if PREC == "tf32r":
        return tl.dot(_round_to_tf32(x), _round_to_tf32(y), input_precision="tf32")
    elif PREC == "fp16":
        return tl.dot(x.to(tl.float16), y.to(tl.float16))
    else:
        return tl.dot(x, y, input_precision=PREC)


@triton.jit
def _operand(x, ROUND: tl.constexpr):
    """x rounded once as a dot operand: "tf32r" (float32 with a tf32 mantissa), "fp16", or "" (unchanged)."""
    if ROUND == "tf32r":
        return _round_to_tf32(x)
    elif ROUND == "fp16":
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def _tile_offsets(i_t, bos, T, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, cols_v):
    """For chunk i_t of the sequence of T tokens that starts at token bos (of the flattened batch), head i_h: its
    token positions, which of them exist (T need not be a multiple of C), and the element offsets of its [C, K]
    tile and of its [C, cols_v] tile in [B, T, H, N] tensors."""
    tok = i_t * C + tl.arange(0, C)
    # (the 64-bit scalar part apart: 32-bit products per element)
    pk = (bos * (H * K) + i_h * K) + tok[:, None] * (H * K) + tl.arange(0, K)[None, :]
    pv = (bos * (H * V) + i_h * V) + tok[:, None] * (H * V) + cols_v[None, :]
    return tok, (tok < T)[:, None], pk, pv


@triton.jit
def _table_row(table, i):
    """Row i of an [n, 4] int32 table (`rwkvkit.ops.varlen.ChunkMap`) as four scalars, in one 16-byte load."""
    cols = tl.arange(0, 4)
    row = tl.load(table + i * 4 + cols)
    return (tl.sum(tl.where(cols == 0, row, 0)), tl.sum(tl.where(cols == 1, row, 0)),
            tl.sum(tl.where(cols == 2, row, 0)), tl.sum(tl.where(cols == 3, row, 0)))


@triton.jit
def _sequence(i_sh, T, H: tl.constexpr, C: tl.constexpr, seq_table, VARLEN: tl.constexpr):
    """A walk program's sequence x head i_sh (a batch row of T tokens, or with VARLEN a packed sequence): its head,
    its first token in the flattened batch, its length, and the flat index of its first C-token chunk in the
    scratch tensors, which hold cdiv(length, C) chunks per sequence and head."""
    i_h = i_sh % H
    if VARLEN:
        bos, length, first, _ = _table_row(seq_table, i_sh // H)
        return i_h, bos.to(tl.int64), length, first.to(tl.int64) * H + i_h * tl.cdiv(length, C)
    else:
        return i_h, (i_sh // H) * T, T, i_sh * tl.cdiv(T, C)


@triton.jit
def _chunk_program(T, H: tl.constexpr, C: tl.constexpr, PER: tl.constexpr, chunk_table, VARLEN: tl.constexpr):
    """A chunk-parallel program's head, chunk within its sequence (counted in 1/PER-ths of the walks' C-token
    chunks; negative for a spare program of a packed grid), the sequence's first token and length, and the flat
    index of its first C-token chunk (as `_sequence`). Grids: (chunks per row x PER, B * H), or packed
    (ChunkMap.n_chunks x PER, H)."""
    if VARLEN:
        i_c = tl.program_id(0)
        i_h = tl.program_id(1)
        walk_chunk, bos, length, first = _table_row(chunk_table, i_c // PER)
        base = first.to(tl.int64) * H + i_h * tl.cdiv(length, C)
        return i_h, walk_chunk * PER + i_c % PER, bos.to(tl.int64), length, base
    else:
        i_bh = tl.program_id(1).to(tl.int64)
        return i_bh % H, tl.program_id(0), (i_bh // H) * T, T, i_bh * tl.cdiv(T, C)


@triton.jit
def _square_offsets(chunk, C: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Element offsets of the [C, C] matrix of flat chunk index `chunk` in a [..., n_chunks, C, C] tensor, or of its
    transpose."""
    rows = tl.arange(0, C)
    first = chunk * C * C
    if TRANSPOSED:
        return first + rows[None, :] * C + rows[:, None]
    return first + rows[:, None] * C + rows[None, :]


@triton.jit
def _row(x, i, C: tl.constexpr):
    """Row i of a [C, N] tile, as an [N] vector (the cumulative decay at one token)."""
    return tl.sum(tl.where(tl.arange(0, C)[:, None] == i, x, 0.0), 0)


@triton.jit
def _decay_factors(ww, C: tl.constexpr):
    """Exponentials of the in-chunk cumulative log decay, split around the middle token (see module doc)."""
    G = tl.cumsum(ww, 0)  # G_t, inclusive
    Gp = G - ww  # G_{t-1}
    Gend = tl.sum(ww, 0)  # G_C, [K]
    Gm = _row(G, C // 2, C)
    e_g = tl.exp(G)  # r side, against S_0
    e_gp = tl.exp(Gp)  # a side, against S_0
    e_g_m = tl.exp(G - Gm[None, :])  # r side, in-chunk pairs
    e_gp_m = tl.exp(Gp - Gm[None, :])  # a side, in-chunk pairs
    e_m_g = tl.exp(Gm[None, :] - G)  # k and b side, in-chunk pairs
    e_end_g = tl.exp(Gend[None, :] - G)  # k and b side, into S_C
    e_end = tl.exp(Gend)  # S_0 into S_C
    return e_g, e_gp, e_g_m, e_gp_m, e_m_g, e_end_g, e_end


@triton.jit
def _pair_matrix(x, y, INCLUSIVE: tl.constexpr, C: tl.constexpr, PC: tl.constexpr):
    """M[t, j] = <x_t, y_j> for j < t (j <= t when INCLUSIVE), zero elsewhere."""
    rows = tl.arange(0, C)
    if INCLUSIVE:
        keep = rows[:, None] >= rows[None, :]
    else:
        keep = rows[:, None] > rows[None, :]
    return tl.where(keep, _dot(x, tl.trans(y), PC), 0.0)


@triton.jit
def _scale(grad_top, SCALED: tl.constexpr):
    """SCALED: the power of two the backward multiplies dy by, which brings its largest element (grad_top, found
    by `_bwd_prep`) into [1/16, 1/8), else 1. Exact, so fp16 operands keep the digits of gradients
    however small the loss makes them (fp16 goes subnormal below 6e-5), with 2^19 of headroom for the state
    gradient, which sums dy over many tokens."""
    if SCALED:
        return _inverse_power_of_two(tl.load(grad_top), 4)
    else:
        return 1.0


@triton.jit
def _unit_scale(x):
    """The power of two 2^-e with 2^e <= max |x| < 2^(e + 1): x times it has its largest element in [1, 2)."""
    return _inverse_power_of_two(tl.max(tl.max(tl.abs(x), 1), 0), 0)


@triton.jit
def _inverse_power_of_two(top, SHIFT: tl.constexpr):
    """2^(-e - SHIFT) for a float32 top >= 0 with 2^e <= top < 2^(e + 1), from top's exponent bits; e is clamped
    so that the result is a normal float32 (tiny or zero top: the largest such, huge or non-finite: the smallest)."""
    exponent = tl.minimum(tl.maximum((top.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1), 253 - SHIFT)  # biased
    return ((254 - SHIFT - exponent) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _chunk_pair_matrix(x, x_factor, y, y_factor, INCLUSIVE: tl.constexpr, C: tl.constexpr, PC: tl.constexpr):
    """_pair_matrix of x * x_factor and y * y_factor, the pair factors of a walk chunk (up to e^{(C/2 + 1) |w|}).
    With fp16 operands, x and y are first scaled to a largest element in [1, 2) (`_unit_scale`, undone on the
    product), so that factors up to 2^15 stay within fp16's range whatever the inputs' size."""
    if PC == "fp16":
        x_scale = _unit_scale(x)
        y_scale = _unit_scale(y)
        m = _pair_matrix(x * x_scale * x_factor, y * y_scale * y_factor, INCLUSIVE, C, PC)
        return m * (1.0 / x_scale) * (1.0 / y_scale)
    else:
        return _pair_matrix(x * x_factor, y * y_factor, INCLUSIVE, C, PC)


@triton.jit
def _unit_lower_inverse(L, C: tl.constexpr, LOG2C: tl.constexpr, PI: tl.constexpr):
    """(I - L)^{-1} for strictly lower-triangular L [C, C]: (I + L)(I + L^2)(I + L^4)... as L^C = 0."""
    rows = tl.arange(0, C)
    inv = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0) + L
    power = L
    for _ in tl.static_range(LOG2C - 1):
        power = _dot(power, power, PI)
        inv = inv + _dot(inv, power, PI)
    return inv


@triton.jit
def _fwd_prep(
    w, k, v, a, b, wa, uv, b_end, k_end, e_end_c, solve_out, chunk_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, LOG2C: tl.constexpr, PC: tl.constexpr, PI: tl.constexpr, STORE_SOLVE: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    """Per chunk, the state-independent parts of U = solve (A~ S_0^T + M_ak V): wa = solve A~, uv = solve M_ak V;
    and for the walk's S_C = S_0 diag(e^{G_C}) + U^T B_e + V^T K_e: B_e, K_e and e^{G_C}. STORE_SOLVE: the
    solve (I - M_ab)^{-1} too, which the backward's preparation needs again."""
    i_h, i_t, bos, T, base = _chunk_program(T, H, C, 1, chunk_table, VARLEN)
    if i_t < 0:  # a spare program of a packed-sequence grid
        return
    chunk = base + i_t
    cols_k = tl.arange(0, K)
    cols_v = tl.arange(0, V)
    tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
    scratch = chunk * C + tl.arange(0, C)[:, None]
    ww = tl.load(w + pk, mask=live, other=0.0).to(tl.float32)
    kk = tl.load(k + pk, mask=live, other=0.0).to(tl.float32)
    aa = tl.load(a + pk, mask=live, other=0.0).to(tl.float32)
    bb = tl.load(b + pk, mask=live, other=0.0).to(tl.float32)
    vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
    e_g, e_gp, e_g_m, e_gp_m, e_m_g, e_end_g, e_end = _decay_factors(ww, C)
    m_ab = _chunk_pair_matrix(aa, e_gp_m, bb, e_m_g, False, C, PC)
    m_ak = _chunk_pair_matrix(aa, e_gp_m, kk, e_m_g, False, C, PC)
    solve = _unit_lower_inverse(m_ab, C, LOG2C, PI)
    if STORE_SOLVE:
        tl.store(solve_out + _square_offsets(chunk, C, False), solve)
    tl.store(wa + scratch * K + cols_k[None, :], _dot(solve, aa * e_gp, PC))
    m_ak_v = _dot(m_ak, vv, PC)
    tl.store(uv + scratch * V + cols_v[None, :], _dot(solve, m_ak_v, PC))
    tl.store(b_end + scratch * K + cols_k[None, :], bb * e_end_g)
    tl.store(k_end + scratch * K + cols_k[None, :], kk * e_end_g)
    tl.store(e_end_c + chunk * K + cols_k, e_end)


@triton.jit
def _fwd_state(
    v, wa, uv, b_end, k_end, e_end_c, u, s0, states, s_final, seq_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, SUB: tl.constexpr, PS: tl.constexpr, HAS_S0: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """The sequential part: walk the chunks, U = uv + wa S_0^T, S_C = S_0 diag(e^{G_C}) + U^T B_e + V^T K_e."""
    i_v = tl.program_id(0)
    i_sh = tl.program_id(1).to(tl.int64)  # sequence x head
    i_h, bos, T, base = _sequence(i_sh, T, H, C, seq_table, VARLEN)
    cols_k = tl.arange(0, K)
    cols_v = i_v * BV + tl.arange(0, BV)
    s_offs = cols_v[:, None] * K + cols_k[None, :]
    if HAS_S0:
        S = tl.load(s0 + i_sh * V * K + s_offs).to(tl.float32)
    else:
        S = tl.zeros([BV, K], dtype=tl.float32)
    for i_t in range(tl.cdiv(T, C)):
        chunk = base + i_t
        tl.store(states + chunk * (C // SUB) * V * K + s_offs, S)
        tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
        scratch = chunk * C + tl.arange(0, C)[:, None]
        vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
        w_a = tl.load(wa + scratch * K + cols_k[None, :])
        U = tl.load(uv + scratch * V + cols_v[None, :])
        b_e = tl.load(b_end + scratch * K + cols_k[None, :]).to(tl.float32)
        k_e = tl.load(k_end + scratch * K + cols_k[None, :]).to(tl.float32)
        e_end = tl.load(e_end_c + chunk * K + cols_k)
        U += _dot(w_a, tl.trans(S), PS)
        tl.store(u + scratch * V + cols_v[None, :], U)
        S = S * e_end[None, :]
        S += _dot(tl.trans(U), b_e, PS)
        S += _dot(tl.trans(vv), k_e, PS)
    tl.store(s_final + i_sh * V * K + s_offs, S)


@triton.jit
def _fwd_out(
    r, w, k, v, b, u, states, y, chunk_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, SUB: tl.constexpr, PS: tl.constexpr, PC: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """y = R~ S_0^T + M_rb U + M_rk V for one chunk; with SUB < C also the states at the starts of its SUB-token
    sub-chunks, S_p = S_0 diag(e^{G_p}) + sum_{j<p} (u_j b_j^T + v_j k_j^T) diag(e^{G_p-G_j}), for the gradient
    kernel."""
    i_h, i_t, bos, T, base = _chunk_program(T, H, C, 1, chunk_table, VARLEN)
    if i_t < 0:  # a spare program of a packed-sequence grid
        return
    chunk = base + i_t
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, K)
    cols_v = tl.arange(0, V)
    tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
    scratch = chunk * C + rows[:, None]
    p_state = chunk * (C // SUB) * V * K + cols_v[:, None] * K + cols_k[None, :]
    S0 = tl.load(states + p_state).to(tl.float32)
    rr = tl.load(r + pk, mask=live, other=0.0).to(tl.float32)
    ww = tl.load(w + pk, mask=live, other=0.0).to(tl.float32)
    kk = tl.load(k + pk, mask=live, other=0.0).to(tl.float32)
    bb = tl.load(b + pk, mask=live, other=0.0).to(tl.float32)
    vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
    U = tl.load(u + scratch * V + cols_v[None, :])
    e_g, e_gp, e_g_m, e_gp_m, e_m_g, e_end_g, e_end = _decay_factors(ww, C)
    m_rb = _chunk_pair_matrix(rr, e_g_m, bb, e_m_g, True, C, PC)
    m_rk = _chunk_pair_matrix(rr, e_g_m, kk, e_m_g, True, C, PC)
    out = _dot(rr * e_g, tl.trans(S0), PS)
    out += _dot(m_rb, U, PC) + _dot(m_rk, vv, PC)
    tl.store(y + pv, out.to(y.dtype.element_ty), mask=live)
    G = tl.cumsum(ww, 0)
    for m in tl.static_range(1, C // SUB):
        g_p = _row(G, m * SUB - 1, C)
        before = tl.where((rows < m * SUB)[:, None], tl.exp(g_p[None, :] - G), 0.0)
        S_p = S0 * tl.exp(g_p)[None, :] + _dot(tl.trans(U), bb * before, PS) + _dot(tl.trans(vv), kk * before, PS)
        tl.store(states + p_state + m * V * K, S_p)


@triton.jit
def _bwd_prep(
    r, w, a, b, dy, grad_top, solve, p1, wb, r_s, a_s, e_end_c, g_sub, chunk_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, PC: tl.constexpr,
    SCALED: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """The state-independent parts of dW = solve^T dU = solve^T M_rb^T dY + (solve^T B_e) dS_C^T, with the solve
    the forward stored; and for the walk's dS_0 = dS_C diag(e^{G_C}) + dY^T R~ + dW^T A~: R~, A~ and e^{G_C}.
    SCALED: the largest |dy| of all chunks goes to grad_top (zero before; the later kernels' `_scale` reads it),
    and p1's products take this chunk's dY scaled the same way by its own largest element (p1 itself is not
    scaled). This replaced a reduction kernel over dy (0.02 ms at the 0.1B shape, H100) at about the same time."""
    i_h, i_t, bos, T, base = _chunk_program(T, H, C, 1, chunk_table, VARLEN)
    if i_t < 0:  # a spare program of a packed-sequence grid
        return
    chunk = base + i_t
    cols_k = tl.arange(0, K)
    cols_v = tl.arange(0, V)
    tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
    scratch = chunk * C + tl.arange(0, C)[:, None]
    rr = tl.load(r + pk, mask=live, other=0.0).to(tl.float32)
    ww = tl.load(w + pk, mask=live, other=0.0).to(tl.float32)
    aa = tl.load(a + pk, mask=live, other=0.0).to(tl.float32)
    bb = tl.load(b + pk, mask=live, other=0.0).to(tl.float32)
    do = tl.load(dy + pv, mask=live, other=0.0).to(tl.float32)
    if SCALED:
        top = tl.max(tl.max(tl.abs(do), 1), 0)
        tl.atomic_max(grad_top, top, sem="relaxed")
        local = _inverse_power_of_two(top, 4)
    else:
        local = 1.0
    e_g, e_gp, e_g_m, e_gp_m, e_m_g, e_end_g, e_end = _decay_factors(ww, C)
    m_rb = _chunk_pair_matrix(rr, e_g_m, bb, e_m_g, True, C, PC)
    solve_t = tl.load(solve + _square_offsets(chunk, C, True))
    du_y = _dot(tl.trans(m_rb), do * local, PC)
    tl.store(p1 + scratch * V + cols_v[None, :], _dot(solve_t, du_y, PC) * (1.0 / local))
    tl.store(wb + scratch * K + cols_k[None, :], _dot(solve_t, bb * e_end_g, PC))
    tl.store(r_s + scratch * K + cols_k[None, :], rr * e_g)
    tl.store(a_s + scratch * K + cols_k[None, :], aa * e_gp)
    tl.store(e_end_c + chunk * K + cols_k, e_end)
    G = tl.cumsum(ww, 0)
    for m in tl.static_range(1, C // SUB):  # G at the sub-chunk boundaries, for the walk's dL/dS there
        tl.store(g_sub + (chunk * (C // SUB) + m) * K + cols_k, _row(G, m * SUB - 1, C))


@triton.jit
def _bwd_state(
    dy, grad_top, p1, wb, r_s, a_s, e_end_c, g_sub, dw_u, ds_final, dstates, ds0, seq_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, SUB: tl.constexpr, PS: tl.constexpr, HAS_DS_FINAL: tl.constexpr, WANT_DS0: tl.constexpr,
    SCALED: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """dL/dS at each chunk end, walking back: dW = p1 + wb dS_C^T, dS_0 = dS_C diag(e^{G_C}) + dY^T R~ + dW^T A~;
    and at the SUB-token sub-chunk boundaries inside each chunk (the states the gradient kernel starts from).
    SCALED: all of it times `_scale`, but dL/dS_0."""
    i_v = tl.program_id(0)
    i_sh = tl.program_id(1).to(tl.int64)  # sequence x head
    i_h, bos, T, base = _sequence(i_sh, T, H, C, seq_table, VARLEN)
    n_chunks = tl.cdiv(T, C)
    cols_k = tl.arange(0, K)
    cols_v = i_v * BV + tl.arange(0, BV)
    s_offs = cols_v[:, None] * K + cols_k[None, :]
    scale = _scale(grad_top, SCALED)
    if HAS_DS_FINAL:
        dS = tl.load(ds_final + i_sh * V * K + s_offs).to(tl.float32) * scale
    else:
        dS = tl.zeros([BV, K], dtype=tl.float32)
    # p1 (the accumulator of dW's product, which Triton's pipeliner leaves out) and e^{G_C} are loaded a chunk
    # ahead by hand, after their last use (H100, 0.1B shape: 0.53 -> 0.50 ms; in the forward walk the same measured
    # 2-4% slower, so it has none)
    rows_c = tl.arange(0, C)[:, None]
    last = base + n_chunks - 1
    dW_next = tl.load(p1 + (last * C + rows_c) * V + cols_v[None, :], mask=rows_c * 0 < n_chunks, other=0.0)
    e_next = tl.load(e_end_c + last * K + cols_k, mask=cols_k * 0 < n_chunks, other=0.0)
    for i_back in range(n_chunks):
        i_t = n_chunks - 1 - i_back
        chunk = base + i_t
        tl.store(dstates + ((chunk + 1) * (C // SUB) - 1) * V * K + s_offs, dS)
        tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
        scratch = chunk * C + rows_c
        do = tl.load(dy + pv, mask=live, other=0.0).to(tl.float32) * scale
        w_b = tl.load(wb + scratch * K + cols_k[None, :])
        r_e = tl.load(r_s + scratch * K + cols_k[None, :]).to(tl.float32)
        a_e = tl.load(a_s + scratch * K + cols_k[None, :]).to(tl.float32)
        e_end = e_next
        dW = dW_next * scale + _dot(w_b, tl.trans(dS), PS)
        tl.store(dw_u + scratch * V + cols_v[None, :], dW)
        # dL/dS at the inner sub-chunk boundaries p (for the gradient kernel); off the walk's dependency chain:
        # dS_p = dS_C diag(e^{G_C-G_p}) + sum_{t>=p} dy_t (r_t e^{G_t-G_p})^T + dW_t (a_t e^{G_{t-1}-G_p})^T
        for m in tl.static_range(1, C // SUB):
            inv_p = tl.exp(-tl.load(g_sub + (chunk * (C // SUB) + m) * K + cols_k))
            after = rows_c >= m * SUB
            dS_p = dS * (e_end * inv_p)[None, :]
            dS_p += _dot(tl.trans(do), tl.where(after, r_e * inv_p[None, :], 0.0), PS)
            dS_p += _dot(tl.trans(dW), tl.where(after, a_e * inv_p[None, :], 0.0), PS)
            tl.store(dstates + (chunk * (C // SUB) + m - 1) * V * K + s_offs, dS_p)
        dS = dS * e_end[None, :]
        dS += _dot(tl.trans(do), r_e, PS)
        dS += _dot(tl.trans(dW), a_e, PS)
        dW_next = tl.load(p1 + (scratch - C) * V + cols_v[None, :], mask=rows_c * 0 < i_t, other=0.0)
        e_next = tl.load(e_end_c + (chunk - 1) * K + cols_k, mask=cols_k * 0 < i_t, other=0.0)
    if WANT_DS0:
        tl.store(ds0 + i_sh * V * K + s_offs, dS / scale)


@triton.jit
def _bwd_chunk(
    r, w, k, v, a, b, dy, grad_top, u, dw_u, states, dstates,
    dr, dw, dk, dv, da, db, chunk_table,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, WALK: tl.constexpr, PS: tl.constexpr, PC: tl.constexpr, ROUND: tl.constexpr,
    ROUND_STATES: tl.constexpr, SCALED: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """All input gradients of one chunk, from S_0, dS_C and the forward's U and the backward's dW.

    Written to keep few tiles alive at once: each gradient is stored as soon as it is complete, the decay factors
    are recomputed where they are used, dS_C and S_0 are loaded in turn, a few tiles are reloaded rather than kept,
    and the decay gradient is summed as it goes (a vector x scaled by e^{+-G} gives +-x dx to that G). With all
    tiles alive to the end it needed 8 warps and ran 1.8x slower (H100: 2.85 -> 1.61 ms at the 0.1B shape).
    ROUND ("tf32r" or "fp16", else ""): round every operand once where it is made (then "tf32r" multiplies with
    plain "tf32"); ROUND_STATES: the states too ("" when they are stored in bf16, which tf32 holds exactly).
    SCALED: dY, and so the walk's dW and dS, come times `_scale`; the input gradients are stored without it.
    C tokens per program; the states and scratch are laid out by the walks' WALK-token chunks (C divides WALK)."""
    i_h, i_t, bos, T, base = _chunk_program(T, H, WALK, WALK // C, chunk_table, VARLEN)
    if i_t < 0:  # a spare program of a packed-sequence grid
        return
    chunk = base * (WALK // C) + i_t
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, K)
    cols_v = tl.arange(0, V)
    tok, live, pk, pv = _tile_offsets(i_t, bos, T, i_h, H, K, V, C, cols_v)
    scratch = (chunk * C + rows[:, None]) * V + cols_v[None, :]
    p_state = chunk * V * K + cols_v[:, None] * K + cols_k[None, :]
    ww = tl.load(w + pk, mask=live, other=0.0).to(tl.float32)
    G = tl.cumsum(ww, 0)  # G_t; G_{t-1} = G - ww
    g_end = tl.sum(ww, 0)
    g_mid = _row(G, C // 2, C)
    kk = tl.load(k + pk, mask=live, other=0.0).to(tl.float32)
    rr = tl.load(r + pk, mask=live, other=0.0).to(tl.float32)
    aa = tl.load(a + pk, mask=live, other=0.0).to(tl.float32)
    bb = tl.load(b + pk, mask=live, other=0.0).to(tl.float32)
    k_in = kk * tl.exp(g_mid[None, :] - G)
    b_in = bb * tl.exp(g_mid[None, :] - G)
    r_in = rr * tl.exp(G - g_mid[None, :])
    a_in = aa * tl.exp(G - ww - g_mid[None, :])
    k_e = kk * tl.exp(g_end[None, :] - G)
    vv = tl.load(v + pv, mask=live, other=0.0).to(tl.float32)
    scale = _scale(grad_top, SCALED)
    do = tl.load(dy + pv, mask=live, other=0.0).to(tl.float32) * scale
    U = tl.load(u + scratch)
    dW = tl.load(dw_u + scratch)
    # rounded here in one run, after all of them are made, rather than each where it is made: that order measured
    # 1.2-1.7% faster fwd+bwd (H100, 2026-11-24)
    k_in = _operand(k_in, ROUND)
    b_in = _operand(b_in, ROUND)
    r_in = _operand(r_in, ROUND)
    a_in = _operand(a_in, ROUND)
    k_e = _operand(k_e, ROUND)
    vv = _operand(vv, ROUND)
    do = _operand(do, ROUND)
    U = _operand(U, ROUND)
    dW = _operand(dW, ROUND)
    m_ak = _pair_matrix(a_in, k_in, False, C, PC)
    m_rk = _pair_matrix(r_in, k_in, True, C, PC)
    incl = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    d_mrb = tl.where(incl, _dot(do, tl.trans(U), PC), 0.0)
    d_mrk = tl.where(incl, _dot(do, tl.trans(vv), PC), 0.0)
    d_mab = tl.where(strict, _dot(dW, tl.trans(U), PC), 0.0)
    d_mak = tl.where(strict, _dot(dW, tl.trans(vv), PC), 0.0)
    m_ak = _operand(m_ak, ROUND)
    m_rk = _operand(m_rk, ROUND)
    d_mrb = _operand(d_mrb, ROUND)
    d_mrk = _operand(d_mrk, ROUND)
    d_mab = _operand(d_mab, ROUND)
    d_mak = _operand(d_mak, ROUND)
    # the parts that meet dS_C: v, and k and b through S_C = S_0 diag(e^{G_C}) + U^T B_e + V^T K_e
    dSC = _operand(tl.load(dstates + p_state).to(tl.float32), ROUND_STATES)
    d_v = _dot(tl.trans(m_rk), do, PC) + _dot(tl.trans(m_ak), dW, PC) + _dot(k_e, tl.trans(dSC), PS)
    inv_scale = 1.0 / scale
    tl.store(dv + pv, (d_v * inv_scale).to(dv.dtype.element_ty), mask=live)
    # Each gradient is the sum of a state part and an in-chunk pairs part; the decay gradient takes x dx of each
    # part with x as that part's products saw it (rounded operands for the pairs), so that the two ends of every
    # pair, which enter G with opposite signs, cancel exactly.
    e_end_g = tl.exp(g_end[None, :] - G)
    d_k_state = _dot(vv, dSC, PS)
    d_k_pairs = _dot(tl.trans(d_mrk), r_in, PC) + _dot(tl.trans(d_mak), a_in, PC)
    tl.store(dk + pk, ((d_k_pairs * tl.exp(g_mid[None, :] - G) + d_k_state * e_end_g) * inv_scale).to(
        dk.dtype.element_ty), mask=live)
    # gradients of G_t (from r, k, b), G_{t-1} (from a) and G_C; the middle-token reference cancels in every pair
    d_gcur = -(d_k_pairs * k_in + d_k_state * k_e)
    d_gend = tl.sum(d_k_state * k_e, 0)
    b_e = tl.load(b + pk, mask=live, other=0.0).to(tl.float32) * e_end_g
    d_b_state = _dot(U, dSC, PS)
    d_b_pairs = _dot(tl.trans(d_mrb), r_in, PC) + _dot(tl.trans(d_mab), a_in, PC)
    tl.store(db + pk, ((d_b_pairs * tl.exp(g_mid[None, :] - G) + d_b_state * e_end_g) * inv_scale).to(
        db.dtype.element_ty), mask=live)
    d_gcur -= d_b_pairs * b_in + d_b_state * b_e
    d_gend += tl.sum(d_b_state * b_e, 0)
    # the parts that meet S_0: r and a through y = R~ S_0^T + ... and U = solve (A~ S_0^T + ...)
    S0 = tl.load(states + p_state).to(tl.float32)
    # G_C's share through S_C = S_0 diag(e^{G_C}) + ...: dS_C reloaded now, so the sum's loads and reduction
    # overlap the products below instead of ending the kernel (H100: 0.03 ms of 1.42)
    d_gend += tl.sum(tl.load(dstates + p_state).to(tl.float32) * S0, 0) * tl.exp(g_end)
    # reloaded rather than kept alive through the dS_C part (cheaper than the registers they would hold)
    do = _operand(tl.load(dy + pv, mask=live, other=0.0).to(tl.float32) * scale, ROUND)
    dW = _operand(tl.load(dw_u + scratch), ROUND)
    S0 = _operand(S0, ROUND_STATES)
    rr = tl.load(r + pk, mask=live, other=0.0).to(tl.float32)
    r_s = rr * tl.exp(G)
    r_in = _operand(rr * tl.exp(G - g_mid[None, :]), ROUND)  # recomputed (the same value) rather than kept alive
    d_r_state = _dot(do, S0, PS)
    d_r_pairs = _dot(d_mrb, b_in, PC) + _dot(d_mrk, k_in, PC)
    tl.store(dr + pk, ((d_r_state * tl.exp(G) + d_r_pairs * tl.exp(G - g_mid[None, :])) * inv_scale).to(
        dr.dtype.element_ty), mask=live)
    d_gcur += d_r_state * r_s + d_r_pairs * r_in
    aa = tl.load(a + pk, mask=live, other=0.0).to(tl.float32)
    a_s = aa * tl.exp(G - ww)
    a_in = _operand(aa * tl.exp(G - ww - g_mid[None, :]), ROUND)
    d_a_state = _dot(dW, S0, PS)
    d_a_pairs = _dot(d_mab, b_in, PC) + _dot(d_mak, k_in, PC)
    tl.store(da + pk, ((d_a_state * tl.exp(G - ww) + d_a_pairs * tl.exp(G - ww - g_mid[None, :])) * inv_scale).to(
        da.dtype.element_ty), mask=live)
    d_gprev = d_a_state * a_s + d_a_pairs * a_in
    # w_l enters G_t for t >= l, G_{t-1} for t > l, and G_C (one scan of the sum, not one per part)
    d_w = tl.cumsum(d_gcur + d_gprev, 0, reverse=True) - d_gprev + d_gend[None, :]
    tl.store(dw + pk, (d_w * inv_scale).to(dw.dtype.element_ty), mask=live)


def _log2(n: int) -> int:
    return n.bit_length() - 1



class _Layout(NamedTuple):
    """What the launches need to know of a call's shapes (WKV7 and WKV6)."""

    B: int
    T: int
    H: int
    K: int
    V: int
    C: int  # tokens per chunk of the walks
    n_seqs: int  # B, or the number of packed sequences
    n_chunks: int  # walk chunks per batch row of the scratch tensors (packed: their one row's chunk_bound)
    bv: int  # value rows per program of the walks
    packed: ChunkMap | None

    def tables(self) -> tuple:
        """The walks' seq_table and the chunk-parallel kernels' chunk_table (None: their VARLEN code is compiled
        out)."""
        return (None, None) if self.packed is None else (self.packed.seq_table, self.packed.chunk_table)

    def whole_head_rows(self, cfg: KernelConfig) -> int:
        """Value rows per program of a walk whose per-chunk loads do not depend on its rows (WKV6's walks, WKV7's
        backward walk): all of a head's once sequences x heads fill the GPU (`WHOLE_HEAD_WALKS`), unless the config
        asks for a block size."""
        return self.V if cfg.block_v is None and self.n_seqs * self.H >= WHOLE_HEAD_WALKS else self.bv

    def chunk_grid(self, sub: int) -> tuple[int, int]:
        """The grid of a chunk-parallel kernel of sub tokens per program (sub divides the walks' chunk)."""
        if self.packed is None:
            return triton.cdiv(self.T, sub), self.B * self.H
        return self.packed.n_chunks * (self.C // sub), self.H


def _layout(r, v, cfg: KernelConfig, cu_seqlens: torch.Tensor | None) -> _Layout:
    B, T, H, K = r.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        n_seqs, n_chunks, packed = B, triton.cdiv(T, cfg.chunk), None
    else:
        packed = chunk_map(cu_seqlens, T, cfg.chunk, r.device)
        # (a bound, so that a fake tensor of the registered op has the same shape as the real one)
        n_seqs, n_chunks = packed.n_seqs, chunk_bound(T, packed.n_seqs, cfg.chunk)
    return _Layout(B, T, H, K, V, cfg.chunk, n_seqs, n_chunks, walk_block_v(n_seqs * H, V, cfg.block_v), packed)


def _seq_launch(cfg: KernelConfig) -> dict:
    return dict(num_warps=cfg.warps_seq) | ({} if cfg.stages_seq is None else dict(num_stages=cfg.stages_seq))


def _saved_dtype(r: torch.Tensor, cfg: KernelConfig, for_grad: bool) -> torch.dtype:
    """The dtype of the per-sub-chunk states (and of their gradients in the backward)."""
    half = for_grad and cfg.half_saved_states and r.dtype in (torch.bfloat16, torch.float16)
    return torch.bfloat16 if half else torch.float32


def _walk_operand_dtype(r: torch.Tensor, cfg: KernelConfig) -> torch.dtype:
    """The dtype of the decayed inputs the walks load (B e^{G_C-G}, K e^{G_C-G}, R e^{G}, A e^{G-w})."""
    half = cfg.half_walk_operands and r.dtype in (torch.bfloat16, torch.float16)
    return torch.float16 if half else torch.float32


def _forward(r, w, k, v, a, b, s0, cu_seqlens, cfg: KernelConfig, for_grad: bool = True, fp16: bool = False):
    """y, the final state, and for the backward the state at the start of every grad_chunk-token sub-chunk, U and
    each chunk's solve (I - M_ab)^{-1}. for_grad False: states only at the chunk starts (the output needs no more),
    no solve (None). fp16: the config's "fp16" precisions are safe here (`fp16_operands_fit`), else "tf32r"."""
    lay = _layout(r, v, cfg, cu_seqlens)
    B, T, H, K, V, n_chunks = lay.B, lay.T, lay.H, lay.K, lay.V, lay.n_chunks
    C = cfg.chunk
    sub = cfg.grad_chunk if for_grad else C
    ps, pc, pi = cfg.precisions(fp16)
    f32 = dict(device=r.device, dtype=torch.float32)
    wa = torch.empty(B, H, n_chunks * C, K, **f32)
    b_end, k_end = (torch.empty(B, H, n_chunks * C, K, device=r.device, dtype=_walk_operand_dtype(r, cfg))
                    for _ in range(2))
    uv = torch.empty(B, H, n_chunks * C, V, **f32)
    u = torch.empty(B, H, n_chunks * C, V, **f32)
    e_end = torch.empty(B, H, n_chunks, K, **f32)
    solve = torch.empty(B, H, n_chunks, C, C, **f32) if for_grad else None
    saved = _saved_dtype(r, cfg, for_grad)
    states = torch.empty(B, H, n_chunks * (C // sub), V, K, device=r.device, dtype=saved)
    s_final = torch.empty(lay.n_seqs, H, V, K, **f32)
    y = torch.empty_like(v, dtype=r.dtype)
    chunks = lay.chunk_grid(C)
    varlen = dict(VARLEN=lay.packed is not None)
    seq_table, chunk_table = lay.tables()
    _fwd_prep[chunks](w, k, v, a, b, wa, uv, b_end, k_end, e_end, e_end if solve is None else solve, chunk_table,
                      T, H, K, V, C, _log2(C), pc, pi, for_grad, **varlen, num_warps=cfg.warps_chunk)
    _fwd_state[(V // lay.bv, lay.n_seqs * H)](
        v, wa, uv, b_end, k_end, e_end, u, s0 if s0 is not None else s_final, states, s_final, seq_table,
        T, H, K, V, lay.bv, C, sub, ps, HAS_S0=s0 is not None, **varlen, **_seq_launch(cfg),
    )  # fmt: skip
    _fwd_out[chunks](r, w, k, v, b, u, states, y, chunk_table, T, H, K, V, C, sub, ps, pc, **varlen,
                     num_warps=cfg.warps_chunk)
    return y, s_final, states, u, solve


def _backward(r, w, k, v, a, b, states, u, solve, dy, ds_final, want_ds0: bool, cu_seqlens, cfg: KernelConfig,
              fp16: bool = False):
    lay = _layout(r, v, cfg, cu_seqlens)
    B, T, H, K, V, n_chunks = lay.B, lay.T, lay.H, lay.K, lay.V, lay.n_chunks
    C, sub = cfg.chunk, cfg.grad_chunk
    # With a gradient on the final state the state gradient can decay, chunk after chunk, far below the largest
    # |dy| that the scale goes by, under fp16's range (only dS_final, and 45 tokens: d(initial state) 20% off);
    # with dy alone it gets dy's own size at every token. So fp16 products in the backward only without dS_final.
    ps, pc, pi = cfg.precisions(fp16 and ds_final is None)
    dy = torch.zeros_like(v, dtype=r.dtype) if dy is None else dy.contiguous()
    scaled = "fp16" in (ps, pc, pi)
    # the largest |dy|, found by _bwd_prep (an atomic maximum) for `_scale`; a placeholder when unscaled
    grad_top = torch.zeros((), device=r.device, dtype=torch.float32) if scaled else dy
    p1 = torch.empty_like(u)
    dw_u = torch.empty_like(u)
    f32 = dict(device=r.device, dtype=torch.float32)
    wb = torch.empty(B, H, n_chunks * C, K, **f32)
    r_s, a_s = (torch.empty(B, H, n_chunks * C, K, device=r.device, dtype=_walk_operand_dtype(r, cfg))
                for _ in range(2))
    e_end = torch.empty(B, H, n_chunks, K, **f32)
    g_sub = torch.empty(B, H, n_chunks, C // sub, K, **f32)
    dstates = torch.empty_like(states)
    ds0 = torch.empty(lay.n_seqs, H, V, K, **f32) if want_ds0 else dstates
    varlen = dict(VARLEN=lay.packed is not None)
    seq_table, chunk_table = lay.tables()
    _bwd_prep[lay.chunk_grid(C)](r, w, a, b, dy, grad_top, solve, p1, wb, r_s, a_s, e_end, g_sub, chunk_table,
                                 T, H, K, V, C, sub, pc, scaled, **varlen, num_warps=cfg.warps_chunk)
    ds_in = ds_final.contiguous() if ds_final is not None else dstates  # (a placeholder when there is none)
    # dL/dS_0 (state tuning) decays the same way through a stretch of tokens without dy (a loss-masked prompt), and
    # it is the whole gradient there: the walk that makes it keeps tf32r (40 of 45 tokens masked: 27x the bf16
    # floor with fp16 products, under 1.2x with tf32r). The gradients of the inputs are not hurt (test_wkv7_triton).
    ps_walk = "tf32r" if want_ds0 and ps == "fp16" else ps
    # its loads of wb, R~, A~ per chunk are the same for every value row: all of them in one program once there
    # are enough programs (H100: 0.415 -> 0.368 ms at B8 H12, 0.439 -> 0.404 at B4 H32; the forward walk measured
    # slower so, 0.322 -> 0.346 ms at B8 H12)
    bv = lay.whole_head_rows(cfg)
    _bwd_state[(V // bv, lay.n_seqs * H)](
        dy, grad_top, p1, wb, r_s, a_s, e_end, g_sub, dw_u, ds_in, dstates, ds0, seq_table,
        T, H, K, V, bv, C, sub, ps_walk, HAS_DS_FINAL=ds_final is not None, WANT_DS0=want_ds0, SCALED=scaled,
        **varlen, **_seq_launch(cfg),
    )  # fmt: skip
    grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
    rounding = ps if cfg.round_once and ps == pc and ps in ("tf32r", "fp16") else ""
    ps_c, pc_c = ("tf32", "tf32") if rounding == "tf32r" else (ps, pc)
    # (fp16: the products round the states themselves)
    round_states = "tf32r" if rounding == "tf32r" and states.dtype == torch.float32 else ""
    _bwd_chunk[lay.chunk_grid(sub)](
        r, w, k, v, a, b, dy, grad_top, u, dw_u, states, dstates, *grads, chunk_table,
        T, H, K, V, sub, C, ps_c, pc_c, rounding, round_states, scaled, **varlen, num_warps=cfg.warps_grad,
    )  # fmt: skip
    return grads, (ds0 if want_ds0 else None)


class _WKV7(torch.autograd.Function):
    """Any KernelConfig (tests, benchmarks); the default config also has an op form for torch.compile below."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, cu_seqlens, cfg, fp16):
        y, s_final, states, u, solve = _forward(r, w, k, v, a, b, s0, cu_seqlens, cfg, fp16=fp16)
        ctx.save_for_backward(r, w, k, v, a, b, states, u, solve, cu_seqlens)
        ctx.cfg, ctx.fp16 = cfg, fp16
        ctx.s0_dtype = None if s0 is None else s0.dtype
        ctx.set_materialize_grads(False)
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        want_ds0 = ctx.s0_dtype is not None and ctx.needs_input_grad[6]
        *saved, cu_seqlens = ctx.saved_tensors
        grads, ds0 = _backward(*saved, dy, ds_final, want_ds0, cu_seqlens, ctx.cfg, ctx.fp16)
        return (*grads, None if ds0 is None else ds0.to(ctx.s0_dtype), None, None, None)


def _n_seqs(r: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return r.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


# The same forward/backward as registered torch ops: torch.compile keeps them as single opaque calls inside its
# graphs (an autograd.Function that launches Triton kernels would split the graph around it instead).
# Explicit schemas: torch 2.4-2.6 cannot read this module's string annotations (`from __future__ import annotations`).
@torch.library.custom_op(
    "rwkvkit::wkv7_fwd", mutates_args=(),
    schema="(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? s0, Tensor? cu_seqlens, "
           "bool fp16) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _wkv7_fwd_op(r, w, k, v, a, b, s0, cu_seqlens, fp16):
    return _forward(r, w, k, v, a, b, s0, cu_seqlens, DEFAULT_CONFIG, fp16=fp16)


@_wkv7_fwd_op.register_fake
def _(r, w, k, v, a, b, s0, cu_seqlens, fp16):
    B, T, H, K = r.shape
    V = v.shape[-1]
    C, sub = DEFAULT_CONFIG.chunk, DEFAULT_CONFIG.grad_chunk
    n_seqs = _n_seqs(r, cu_seqlens)
    n = -(-T // C) if cu_seqlens is None else chunk_bound(T, n_seqs, C)
    f32 = dict(device=r.device, dtype=torch.float32)
    saved = dict(device=r.device, dtype=_saved_dtype(r, DEFAULT_CONFIG, True))
    return (v.new_empty(B, T, H, V, dtype=r.dtype), r.new_empty(n_seqs, H, V, K, **f32),
            r.new_empty(B, H, n * (C // sub), V, K, **saved), r.new_empty(B, H, n * C, V, **f32),
            r.new_empty(B, H, n, C, C, **f32))


@torch.library.custom_op(
    "rwkvkit::wkv7_bwd", mutates_args=(),
    schema="(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor states, Tensor u, Tensor solve, "
           "Tensor dy, Tensor? ds_final, bool want_ds0, Tensor? cu_seqlens, bool fp16) -> Tensor[]",
)
def _wkv7_bwd_op(r, w, k, v, a, b, states, u, solve, dy, ds_final, want_ds0, cu_seqlens, fp16):
    grads, ds0 = _backward(r, w, k, v, a, b, states, u, solve, dy, ds_final, want_ds0, cu_seqlens, DEFAULT_CONFIG,
                           fp16)
    return grads + ([ds0] if want_ds0 else [])


@_wkv7_bwd_op.register_fake
def _(r, w, k, v, a, b, states, u, solve, dy, ds_final, want_ds0, cu_seqlens, fp16):
    grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
    K = r.shape[-1]
    ds0 = r.new_empty(_n_seqs(r, cu_seqlens), r.shape[2], v.shape[-1], K, dtype=torch.float32)
    return grads + ([ds0] if want_ds0 else [])


def _op_setup(ctx, inputs, output):
    r, w, k, v, a, b, s0, cu_seqlens, ctx.fp16 = inputs
    _, _, states, u, solve = output
    ctx.save_for_backward(r, w, k, v, a, b, states, u, solve, cu_seqlens)
    ctx.s0_dtype = None if s0 is None else s0.dtype
    # unused outputs (the final state, the saved per-chunk tensors) then get None, not zero tensors of their size
    ctx.set_materialize_grads(False)


def _op_backward(ctx, dy, ds_final, _d_states, _d_u, _d_solve):
    want_ds0 = ctx.s0_dtype is not None and ctx.needs_input_grad[6]
    r, w, k, v, a, b, states, u, solve, cu_seqlens = ctx.saved_tensors
    dy = torch.zeros_like(v, dtype=r.dtype) if dy is None else dy
    out = _wkv7_bwd_op(r, w, k, v, a, b, states, u, solve, dy, ds_final, want_ds0, cu_seqlens, ctx.fp16)
    return (*out[:6], out[6].to(ctx.s0_dtype) if want_ds0 else None, None, None)


_wkv7_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def log_decay_floor(cfg: KernelConfig) -> float:
    """The lowest log decay per token that the WKV7 and WKV6 kernels take with this config. Their in-chunk pair
    factors e^{G_t - G_ref} and e^{G_ref - G_j} span up to C/2 + 1 tokens around the chunk's middle token, and
    e^72 leaves float32 room for the inputs' own size: -4.2 at 32 tokens, -8 at 16. WKV6's `pair_levels` split
    steep chunks down to blocks of C / 2^levels tokens, each with its own middle (-14.4 at 32 tokens and 2 levels).
    Below it the factors overflow: WKV7 hands such inputs to the chunked PyTorch path (RWKV-7 models have
    w > -e^{-0.5}), WKV6 floors them (see its module)."""
    return -72.0 / ((cfg.chunk >> cfg.pair_levels) // 2 + 1)


def fp16_operands_fit(cfg: KernelConfig, dtype: torch.dtype, log_decay_min: float | None) -> bool:
    """Whether the config's "fp16" precisions apply to a call (else "tf32r"): 16-bit inputs, and a known lowest
    log decay at which the pair factors stay within fp16's range: those of the walks' chunks (chunk/2 + 1 tokens,
    on unit-scaled inputs) within 2^15, the gradient kernel's (grad_chunk/2 + 1 tokens) within 2^8. For the default
    config that is -0.611 per token, which RWKV-7's -e^{-0.5} bound meets."""
    return (dtype in (torch.bfloat16, torch.float16) and log_decay_min is not None
            and log_decay_min * (cfg.chunk // 2 + 1) >= -15 * math.log(2)
            and log_decay_min * (cfg.grad_chunk // 2 + 1) >= -8 * math.log(2))


def _lowest_log_decay(w: torch.Tensor) -> float:
    return w.amin().item()  # waits for the GPU


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _supported(r: torch.Tensor, v: torch.Tensor, cfg: KernelConfig) -> bool:
    """Whether the kernels take these head sizes (else the PyTorch path does); a config they cannot run is an error,
    not a quiet fallback (WKV7 and WKV6)."""
    if not (_pow2_at_least_16(cfg.chunk) and _pow2_at_least_16(cfg.grad_chunk) and cfg.grad_chunk <= cfg.chunk):
        from rwkvkit.errors import ConfigError

        raise ConfigError(f"KernelConfig needs chunk and grad_chunk powers of two >= 16 with grad_chunk <= chunk, "
                          f"got chunk={cfg.chunk} grad_chunk={cfg.grad_chunk}")
    K, V = r.shape[-1], v.shape[-1]
    return _pow2_at_least_16(K) and _pow2_at_least_16(V) and K <= 128 and V <= 128


def wkv7_triton(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    config: KernelConfig | None = None,
    log_decay_min: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `rwkvkit.ops.wkv7.wkv7`: [B, T, H, N] inputs, w = log decay, state [B, H, N_v, N_k] fp32;
    with cu_seqlens, sequences packed into one row [1, T_total, H, N] and states [N_seqs, H, N_v, N_k]
    (`rwkvkit.ops.varlen`).

    Returns y in r's dtype and the final state in float32; differentiable in all inputs and initial_state.
    Head sizes that are not a power of two in [16, 128] go to the chunked PyTorch path. config None: DEFAULT_CONFIG.
    log_decay_min: a lower bound of w that the caller guarantees (RWKV-7 models: -e^{-0.5}); None: the call finds
    w's minimum (one wait for the GPU), except while a CUDA graph records, under `without_device_syncs` or under
    torch.compile, where inputs go unchecked. Inputs whose log decay goes below log_decay_floor(config) (-4.2 for
    the default config), which would overflow the kernels' factors, take the chunked PyTorch path instead (exact
    for any w <= 0).
    """
    check_triton_device(r, "WKV kernels", "chunked")
    if cu_seqlens is not None:  # (kept where it is: from the CPU the launches get exact grids)
        check_cu_seqlens(cu_seqlens, r, initial_state)
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, w, k, v, a, b, initial_state))
    config = DEFAULT_CONFIG if config is None else config
    if config.pair_levels:
        from rwkvkit.errors import ConfigError

        raise ConfigError("KernelConfig.pair_levels is a WKV6 option; the WKV7 kernels have no such split")
    supported = _supported(r, v, config)  # (a config the kernels cannot run raises here)
    may_wait = not torch.compiler.is_compiling() and device_sync_allowed(r)
    if log_decay_min is None and supported and w.numel() and may_wait:
        log_decay_min = _lowest_log_decay(w)
    if not supported or (log_decay_min is not None and log_decay_min < log_decay_floor(config)):
        from rwkvkit.ops.wkv7 import wkv7

        return wkv7(r, w, k, v, a, b, initial_state, impl="chunked", cu_seqlens=cu_seqlens)
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    s0 = None if initial_state is None else initial_state.contiguous()
    fp16 = config.uses_fp16() and fp16_operands_fit(config, r.dtype, log_decay_min)
    # under torch.compile only the default config is a registered op (an opaque call in the graph)
    if config is DEFAULT_CONFIG and (wants_grad or torch.compiler.is_compiling()):
        y, s_final, *_ = _wkv7_fwd_op(r, w, k, v, a, b, s0, cu_seqlens, fp16)
        return y, s_final
    if wants_grad:
        return _WKV7.apply(r, w, k, v, a, b, s0, cu_seqlens, config, fp16)
    y, s_final, *_ = _forward(r, w, k, v, a, b, s0, cu_seqlens, config, for_grad=False, fp16=fp16)
    return y, s_final
