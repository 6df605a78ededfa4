"""RWKV-4 WKV in Triton: one program per (batch row, block of channels) walks the tokens, state in registers.

The v4 recurrence is per channel (no matrix state), so a sequential walk reads every input once and is bound by
memory traffic, not by the walk; there is nothing for a chunked form to win here.

Forward: the official max-subtracted update (aa, bb, pp), exactly as `naive.py` writes it. When gradients are
needed it also stores the state after every token ([B, T, 3, C] float32) for the backward walk.

Backward, in scaled form so nothing overflows: with a_t = aa_t e^{p_t} (and b_t likewise) the true numerator and
denominator, carry ga_t = dL/da_t e^{p_t}, gb_t likewise, and gp_t, the gradient reaching p_t through the running
max alone (it only starts at the final state's pp). Per token, going back:
  y_t = (a_{t-1} + e^{u+k_t} v_t) / (b_{t-1} + e^{u+k_t})    gives the direct dv_t, dk_t, du and ga/gb_{t-1};
  a_t = e^w a_{t-1} + e^{k_t} v_t, b_t = e^w b_{t-1} + e^{k_t} gives dv_t, dk_t, dw, and ga/gb_{t-1} += e^{w+p_{t-1}-p_t} ga/gb_t;
  p_t = max(p_{t-1} + w, k_t)                                 routes gp_t to (p_{t-1}, w) or to k_t.
Every exponent there is <= 0 (p_t >= p_{t-1} + w and p_t >= k_t), so the walk is as stable as the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rwkvkit.ops import check_triton_device

from .naive import EMPTY_PP

# Channels per program: each program walks all T tokens, so the GPU is only busy with enough programs; blocks
# shrink (down to one warp's 32 lanes) until there are at least this many.
MIN_PROGRAMS = 512
EMPTY = tl.constexpr(EMPTY_PP)


@triton.jit
def _load_state(ptr, cols, C, mask):
    aa = tl.load(ptr + cols, mask=mask, other=0.0)
    bb = tl.load(ptr + C + cols, mask=mask, other=0.0)
    pp = tl.load(ptr + 2 * C + cols, mask=mask, other=EMPTY)
    return aa, bb, pp


@triton.jit
def _initial_state(s0_ptr, cols, C, live, HAS_S0: tl.constexpr):
    """The given state, or (masked off entirely) the empty one: aa = bb = 0, pp = EMPTY."""
    return _load_state(s0_ptr, cols, C, live & HAS_S0)


@triton.jit
def _store_state(ptr, cols, C, mask, aa, bb, pp):
    tl.store(ptr + cols, aa, mask=mask)
    tl.store(ptr + C + cols, bb, mask=mask)
    tl.store(ptr + 2 * C + cols, pp, mask=mask)


@triton.jit
def _this_program(w_ptr, u_ptr, C, BLOCK: tl.constexpr):
    """This program's batch row and channels (and which are inside C), with their decay and bonus."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < C
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + cols, mask=live, other=0.0).to(tl.float32)
    return b, cols, live, w, u


@triton.jit
def _token(ptr, b, t, T, C, cols, live):
    """Token t's [BLOCK] channels of a [B, T, C] input as float32 (zeros outside [0, T): t is a [BLOCK] vector)."""
    return tl.load(ptr + (b * T + t) * C + cols, mask=live & (t >= 0) & (t < T), other=0.0).to(tl.float32)


@triton.jit
def _fwd(w_ptr, u_ptr, k_ptr, v_ptr, s0_ptr, y_ptr, states_ptr, s_final_ptr, T, C,
         HAS_S0: tl.constexpr, SAVE: tl.constexpr, BLOCK: tl.constexpr):
    b, cols, live, w, u = _this_program(w_ptr, u_ptr, C, BLOCK)
    aa, bb, pp = _initial_state(s0_ptr + b * 3 * C, cols, C, live, HAS_S0)
    # Each token's loads are issued a token ahead, before the walk needs them: the chain of exponentials is short,
    # and a load that starts only when the token does is what the walk waits for (H100: fwd+bwd 4.51 -> 3.69 ms).
    zero = tl.zeros([BLOCK], dtype=tl.int32)  # t as a vector (the interpreter's loop counter is a plain int)
    k_next = _token(k_ptr, b, zero, T, C, cols, live)
    v_next = _token(v_ptr, b, zero, T, C, cols, live)
    for t in range(T):
        kt, vt = k_next, v_next
        k_next = _token(k_ptr, b, zero + t + 1, T, C, cols, live)
        v_next = _token(v_ptr, b, zero + t + 1, T, C, cols, live)
        at = (b * T + t) * C + cols
        q = tl.maximum(pp, u + kt)
        e1 = tl.exp(pp - q)
        e2 = tl.exp(u + kt - q)
        tl.store(y_ptr + at, ((e1 * aa + e2 * vt) / (e1 * bb + e2)).to(y_ptr.dtype.element_ty), mask=live)
        q = tl.maximum(pp + w, kt)
        e1 = tl.exp(pp + w - q)
        e2 = tl.exp(kt - q)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = q
        if SAVE:
            _store_state(states_ptr + (b * T + t) * 3 * C, cols, C, live, aa, bb, pp)
    _store_state(s_final_ptr + b * 3 * C, cols, C, live, aa, bb, pp)


@triton.jit
def _bwd_token(k_ptr, v_ptr, dy_ptr, states_ptr, b, t, T, C, cols, live):
    """What the backward walk reads for token t: k, v, dy and the saved state after token t - 1 (zeros for t = 0,
    which the walk replaces by the initial state)."""
    kt = _token(k_ptr, b, t, T, C, cols, live)
    vt = _token(v_ptr, b, t, T, C, cols, live)
    dyt = _token(dy_ptr, b, t, T, C, cols, live)
    prev = states_ptr + (b * T + t - 1) * 3 * C + cols
    ok = live & (t >= 1) & (t <= T)
    aa_p = tl.load(prev, mask=ok, other=0.0)
    bb_p = tl.load(prev + C, mask=ok, other=0.0)
    p_p = tl.load(prev + 2 * C, mask=ok, other=0.0)
    return kt, vt, dyt, aa_p, bb_p, p_p


@triton.jit
def _bwd(w_ptr, u_ptr, k_ptr, v_ptr, s0_ptr, states_ptr, dy_ptr, ds_final_ptr, dk_ptr, dv_ptr, dw_ptr, du_ptr,
         ds0_ptr, T, C, HAS_S0: tl.constexpr, HAS_DS_FINAL: tl.constexpr, BLOCK: tl.constexpr):
    b, cols, live, w, u = _this_program(w_ptr, u_ptr, C, BLOCK)
    aa0, bb0, pp0 = _initial_state(s0_ptr + b * 3 * C, cols, C, live, HAS_S0)
    aa_t, bb_t, p_t = _load_state(states_ptr + (b * T + T - 1) * 3 * C, cols, C, live)
    p_t = tl.where(live, p_t, 0.0)  # lanes past C: finite, as every other value there
    if HAS_DS_FINAL:
        gaa, gbb, gpp = _load_state(ds_final_ptr + b * 3 * C, cols, C, live)
        gpp = tl.where(live, gpp, 0.0)
        ga = gaa
        gb = gbb
        gp = gpp - gaa * aa_t - gbb * bb_t  # aa_T = a_T e^{-p_T}: p_T also moves aa_T and bb_T
    else:
        ga = tl.zeros([BLOCK], dtype=tl.float32)
        gb = tl.zeros([BLOCK], dtype=tl.float32)
        gp = tl.zeros([BLOCK], dtype=tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    du = tl.zeros([BLOCK], dtype=tl.float32)
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    # loads a token ahead, as in the forward; p_t of the next token back is this token's p_{t-1}
    k_n, v_n, dy_n, aa_n, bb_n, p_n = _bwd_token(k_ptr, v_ptr, dy_ptr, states_ptr, b, zero + T - 1, T, C, cols, live)
    for i in range(T):
        t = T - 1 - i
        kt, vt, dyt, aa_p, bb_p, p_saved = k_n, v_n, dy_n, aa_n, bb_n, p_n
        k_n, v_n, dy_n, aa_n, bb_n, p_n = _bwd_token(k_ptr, v_ptr, dy_ptr, states_ptr, b, zero + t - 1, T, C,
                                                     cols, live)
        first = t == 0
        aa_p = tl.where(first, aa0, aa_p)
        bb_p = tl.where(first, bb0, bb_p)
        p_p = tl.where(first, pp0, p_saved)
        # the output: y_t = N / D with the max exponent q taken out of both
        q = tl.maximum(p_p, u + kt)
        e1 = tl.exp(p_p - q)
        e2 = tl.exp(u + kt - q)
        den = e1 * bb_p + e2
        y = (e1 * aa_p + e2 * vt) / den
        dkt = dyt * e2 * (vt - y) / den
        du += dkt
        dvt = dyt * e2 / den
        ga_p = dyt * e1 / den
        gb_p = -dyt * y * e1 / den
        # the state update
        ek = tl.exp(kt - p_t)
        decay = tl.exp(w + p_p - p_t)
        dvt += ga * ek
        dkt += (ga * vt + gb) * ek
        dw += decay * (ga * aa_p + gb * bb_p)
        ga_p += decay * ga
        gb_p += decay * gb
        # the running max p_t = max(p_{t-1} + w, k_t)
        keeps = p_p + w >= kt
        dw += tl.where(keeps, gp, 0.0)
        dkt += tl.where(keeps, 0.0, gp)
        gp = tl.where(keeps, gp, 0.0)
        at = (b * T + t) * C + cols
        tl.store(dk_ptr + at, dkt.to(dk_ptr.dtype.element_ty), mask=live)
        tl.store(dv_ptr + at, dvt.to(dv_ptr.dtype.element_ty), mask=live)
        ga = ga_p
        gb = gb_p
        p_t = p_saved
    tl.store(dw_ptr + b * C + cols, dw, mask=live)
    tl.store(du_ptr + b * C + cols, du, mask=live)
    if HAS_S0:  # a_0 = aa_0 e^{pp_0}
        _store_state(ds0_ptr + b * 3 * C, cols, C, live, ga, gb, gp + ga * aa0 + gb * bb0)


def _launch(B, C):
    """Grid and meta-parameters: the widest block (128 channels) that still gives MIN_PROGRAMS programs."""
    block = 128
    while block > 32 and B * triton.cdiv(C, block) < MIN_PROGRAMS:
        block //= 2
    return (B, triton.cdiv(C, block)), dict(BLOCK=block, num_warps=block // 32)


def _forward(w, u, k, v, s0, save: bool):
    B, T, C = k.shape
    f32 = dict(device=k.device, dtype=torch.float32)
    y = torch.empty_like(k)
    s_final = torch.empty(B, 3, C, **f32)
    states = torch.empty(B, T, 3, C, **f32) if save else s_final
    grid, meta = _launch(B, C)
    _fwd[grid](w, u, k, v, s0 if s0 is not None else s_final, y, states, s_final, T, C,
               HAS_S0=s0 is not None, SAVE=save, **meta)
    return y, s_final, states


class _WKV4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, s0):
        y, s_final, states = _forward(w, u, k, v, s0, save=True)
        ctx.save_for_backward(w, u, k, v, s0, states)
        ctx.set_materialize_grads(False)
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        w, u, k, v, s0, states = ctx.saved_tensors
        B, T, C = k.shape
        dy = torch.zeros_like(k) if dy is None else dy.contiguous()
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dw = torch.empty(B, C, device=k.device, dtype=torch.float32)
        du = torch.empty_like(dw)
        ds0 = torch.empty(B, 3, C, device=k.device, dtype=torch.float32) if s0 is not None else None
        grid, meta = _launch(B, C)
        _bwd[grid](
            w, u, k, v, s0 if s0 is not None else states, states, dy,
            ds_final.contiguous() if ds_final is not None else states, dk, dv, dw, du,
            ds0 if ds0 is not None else states, T, C,
            HAS_S0=s0 is not None, HAS_DS_FINAL=ds_final is not None, **meta,
        )  # fmt: skip
        return dw.sum(0).to(w.dtype), du.sum(0).to(u.dtype), dk, dv, ds0


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
    y, s_final, _ = _forward(w, u, k, v, s0, save=False)
    return y, s_final
