"""One RWKV-7 decoding step (T == 1) as five fused Triton kernels per layer, for batches of a few streams.

At batch 1 a step reads every weight once (2.8 GB at 1.5B) and does almost no arithmetic, so its speed is set by
memory bandwidth and by how many kernels it launches: the model's own code, even compiled, is ~21 kernels per
layer whose gaps cost more than the weights they read. Here a layer is five kernels, each streaming its matrices
once; every one of them starts where the layer has a dependency across the whole vector (a LayerNorm, a matrix
product's input):

  _att_in     ln1 + token-shift mixes + the r, k, v projections and the four LoRA down-projections (w, a, v, g)
  _att_core   per (batch, head): LoRA up-projections, decay, value residual, kk normalisation, the WKV state
              update, GroupNorm, r_k bonus and gate
  _proj_add   output projection + residual (and the new token-shift state), reused for the channel-mix's value
  _ffn_in     ln2 + mix + key projection + relu^2
plus _embed (embedding + ln0) before the first layer and _head (ln_out + head) after the last.

Matrix products are row blocks of `W x` with float32 accumulation. Everything inside a kernel is float32; values
are rounded to the model's dtype only where they are stored (the residual stream, the token-shift state, the
buffers passed between kernels), as torch.compile's fused kernels do: in fp16 the step is closer to a float32 run
than the model's eager fp16 forward is. Reference: `RWKV7.run_unchecked` (tests/runtime/test_fused_step.py). The
recurrent state stays float32 and is updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rwkvkit.errors import ConfigError
from rwkvkit.ops import check_triton_device

try:  # programmatic dependent launch (Hopper on; triton >= 3.3)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

_LOG_DECAY_SCALE = tl.constexpr(-0.6065306597126334)  # -exp(-0.5), as in models/v7.py
_NORMALIZE_EPS = tl.constexpr(1e-12)  # F.normalize's default


@dataclass(frozen=True)
class Tiling:
    """A matrix product's programs: `rows` output rows each, `k` input columns per load, `warps` warps."""

    rows: int
    k: int
    warps: int

    def __post_init__(self):
        if any(n < 1 or n & (n - 1) for n in (self.rows, self.k, self.warps)):
            raise ConfigError(f"tiling sizes must be powers of two, got {self}")


@dataclass(frozen=True)
class StepConfig:
    """Tilings of the three kinds of products (LayerNorm-input ones, residual ones, the head) and the warps of
    the per-head kernel."""

    # tuned on an H100 at 1.5B, bsz 1 (BENCHMARKS.md): at most +-3% apart for 4-16 rows of 1024-2048 columns
    ln_in: Tiling = Tiling(8, 2048, 4)  # _att_in, _ffn_in
    residual: Tiling = Tiling(4, 2048, 8)  # _proj_add
    head: Tiling = Tiling(4, 1024, 4)
    core_warps: int = 8
    # programmatic dependent launch where the GPU and triton have it (see _after_previous_kernel)
    pdl: bool = True


@triton.jit
def _after_previous_kernel(PDL: tl.constexpr):
    """Wait for the previous kernel's results. With programmatic dependent launch a kernel starts while the previous
    one is still finishing, so before this call it may only read what no kernel of the step writes (weights, and
    its own layer's WKV state): the loads of its first weight tile overlap the previous kernel's tail. Letting the
    next kernel start only after this wait keeps every earlier kernel finished by the time that one runs."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _ln_stats(x_ptr, C: tl.constexpr, eps, BK: tl.constexpr):
    """Mean and 1/std of a length-C row (two passes, float32)."""
    total = tl.zeros([BK], tl.float32)
    for c0 in range(0, C, BK):
        offs = c0 + tl.arange(0, BK)
        total += tl.load(x_ptr + offs, mask=offs < C, other=0.0).to(tl.float32)
    mean = tl.sum(total, 0) / C
    sq = tl.zeros([BK], tl.float32)
    for c0 in range(0, C, BK):
        offs = c0 + tl.arange(0, BK)
        d = tl.load(x_ptr + offs, mask=offs < C, other=0.0).to(tl.float32) - mean
        sq += tl.where(offs < C, d * d, 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(sq, 0) / C + eps)


@triton.jit
def _ln_mix_input(x_ptr, lnw_ptr, lnb_ptr, mean, rstd, prev_ptr, mix_ptr, offs, inside, xa_out_ptr, write_xa,
                  HAS_MIX: tl.constexpr):
    """LayerNorm(x)[offs], mixed with the previous token's (xa + (prev - xa) mix); write_xa: also store xa."""
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    lnw = tl.load(lnw_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    xa = ((x - mean) * rstd * lnw + lnb).to(xa_out_ptr.dtype.element_ty)
    if write_xa:
        tl.store(xa_out_ptr + offs, xa, mask=inside)
    xin = xa.to(tl.float32)
    if HAS_MIX:
        prev = tl.load(prev_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        mix = tl.load(mix_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        xin = xin + (prev - xin) * mix
    return xin


@triton.jit
def _ln_mix_dot(x_ptr, eps, lnw_ptr, lnb_ptr, prev_ptr, mix_ptr, w_ptr, rows, row_mask, xa_out_ptr, write_xa,
                C: tl.constexpr, STRIDE_ROW: tl.constexpr, STRIDE_K: tl.constexpr, HAS_MIX: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """sum_c W[rows, c] * in[c], in = `_ln_mix_input` of the row x. W is addressed as rows * STRIDE_ROW +
    c * STRIDE_K, so a LoRA down-projection [C, R] is read in place. write_xa: also store LayerNorm(x) (one
    program does, for the next token's shift state). The first weight tile is loaded before the wait."""
    offs = tl.arange(0, BK)
    w = tl.load(w_ptr + rows[:, None] * STRIDE_ROW + offs[None, :] * STRIDE_K,
                mask=row_mask[:, None] & (offs < C)[None, :], other=0.0)
    _after_previous_kernel(PDL)
    mean, rstd = _ln_stats(x_ptr, C, eps, BK)
    xin = _ln_mix_input(x_ptr, lnw_ptr, lnb_ptr, mean, rstd, prev_ptr, mix_ptr, offs, offs < C, xa_out_ptr,
                        write_xa, HAS_MIX)
    acc = w.to(tl.float32) * xin[None, :]
    for c0 in range(BK, C, BK):
        offs = c0 + tl.arange(0, BK)
        inside = offs < C
        w = tl.load(w_ptr + rows[:, None] * STRIDE_ROW + offs[None, :] * STRIDE_K,
                    mask=row_mask[:, None] & inside[None, :], other=0.0)
        xin = _ln_mix_input(x_ptr, lnw_ptr, lnb_ptr, mean, rstd, prev_ptr, mix_ptr, offs, inside, xa_out_ptr,
                            write_xa, HAS_MIX)
        acc += w.to(tl.float32) * xin[None, :]
    return tl.sum(acc, 1)


@triton.jit
def _dequant(y, scale_ptr, rows, row_mask, INT8: tl.constexpr):
    """Row sums of an int8 matrix times its per-row scales (`runtime.quant.Int8Linear`); others unchanged."""
    if INT8:
        y = y * tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _embed_kernel(tok_ptr, emb_ptr, lnw_ptr, lnb_ptr, x_ptr, eps, C: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0)
    row = emb_ptr + tl.load(tok_ptr + b) * C
    mean, rstd = _ln_stats(row, C, eps, BK)
    for c0 in range(0, C, BK):
        offs = c0 + tl.arange(0, BK)
        inside = offs < C
        e = tl.load(row + offs, mask=inside, other=0.0).to(tl.float32)
        lnw = tl.load(lnw_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        lnb = tl.load(lnb_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(x_ptr + b * C + offs, ((e - mean) * rstd * lnw + lnb).to(x_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _lora_down(x_ptr, eps, lnw_ptr, lnb_ptr, prev_ptr, mix_ptr, w_ptr, out_ptr, block,
               C: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """Rows [block * BN, ...) of in @ W for a LoRA down-projection W [C, R]."""
    rows = block * BN + tl.arange(0, BN)
    y = _ln_mix_dot(x_ptr, eps, lnw_ptr, lnb_ptr, prev_ptr, mix_ptr, w_ptr, rows, rows < R, out_ptr,
                    False, C, 1, R, True, BN, BK, PDL)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rows < R)


@triton.jit
def _att_in_kernel(x_ptr, prev_ptr, lnw_ptr, lnb_ptr, mr_ptr, mk_ptr, mv_ptr, mw_ptr, ma_ptr, mg_ptr,
                   wr_ptr, wk_ptr, wv_ptr, sr_ptr, sk_ptr, sv_ptr, w1_ptr, a1_ptr, v1_ptr, g1_ptr, rkv_ptr,
                   down_ptr, xa_ptr, eps, C: tl.constexpr, RW: tl.constexpr, RA: tl.constexpr, RV: tl.constexpr,
                   RG: tl.constexpr, INT8: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   PDL: tl.constexpr):
    """Programs [0, 3 C / BN): row blocks of r, k, v; the rest: row blocks of the w, a, v, g LoRA downs."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    x_ptr += b * C
    prev_ptr += b * C
    blocks = (C + BN - 1) // BN
    if pid < 3 * blocks:
        which = pid // blocks
        rows = (pid % blocks) * BN + tl.arange(0, BN)
        if which == 0:
            w_ptr = wr_ptr
            s_ptr = sr_ptr
            mix_ptr = mr_ptr
        elif which == 1:
            w_ptr = wk_ptr
            s_ptr = sk_ptr
            mix_ptr = mk_ptr
        else:
            w_ptr = wv_ptr
            s_ptr = sv_ptr
            mix_ptr = mv_ptr
        y = _ln_mix_dot(x_ptr, eps, lnw_ptr, lnb_ptr, prev_ptr, mix_ptr, w_ptr, rows, rows < C,
                        xa_ptr + b * C, pid == 0, C, C, 1, True, BN, BK, PDL)
        y = _dequant(y, s_ptr, rows, rows < C, INT8)
        tl.store(rkv_ptr + b * 3 * C + which * C + rows, y.to(rkv_ptr.dtype.element_ty), mask=rows < C)
    else:
        j = pid - 3 * blocks
        nw = (RW + BN - 1) // BN
        na = (RA + BN - 1) // BN
        nv = (RV + BN - 1) // BN
        out = down_ptr + b * (RW + RA + RV + RG)
        if j < nw:
            _lora_down(x_ptr, eps, lnw_ptr, lnb_ptr, prev_ptr, mw_ptr, w1_ptr, out, j, C, RW, BN, BK, PDL)
        elif j < nw + na:
            _lora_down(x_ptr, eps, lnw_ptr, lnb_ptr, prev_ptr, ma_ptr, a1_ptr, out + RW, j - nw,
                       C, RA, BN, BK, PDL)
        elif j < nw + na + nv:
            _lora_down(x_ptr, eps, lnw_ptr, lnb_ptr, prev_ptr, mv_ptr, v1_ptr, out + RW + RA, j - nw - na,
                       C, RV, BN, BK, PDL)
        else:
            _lora_down(x_ptr, eps, lnw_ptr, lnb_ptr, prev_ptr, mg_ptr, g1_ptr, out + RW + RA + RV,
                       j - nw - na - nv, C, RG, BN, BK, PDL)


@triton.jit
def _lora_tile(up_ptr, ch, C: tl.constexpr, R: tl.constexpr, RP: tl.constexpr):
    """Columns ch of a LoRA up-projection up [R, C], rows padded to RP (a power of two) with zeros. One tile: a
    loop over rank chunks waits for each chunk's loads in turn (2.2x slower at 1.5B), and the whole tile fits in
    the registers of 4 warps."""
    r = tl.arange(0, RP)
    return tl.load(up_ptr + r[:, None] * C + ch[None, :], mask=(r < R)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _lora_up(d_ptr, tile, R: tl.constexpr, RP: tl.constexpr, ACT: tl.constexpr):
    """act(d) @ tile; act 0: none, 1: tanh, 2: sigmoid."""
    r = tl.arange(0, RP)
    d = tl.load(d_ptr + r, mask=r < R, other=0.0).to(tl.float32)
    if ACT == 1:
        d = 2.0 * tl.sigmoid(2.0 * d) - 1.0
    elif ACT == 2:
        d = tl.sigmoid(d)
    return tl.sum(d[:, None] * tile, 0)


@triton.jit
def _att_core_kernel(rkv_ptr, down_ptr, vfirst_ptr, state_ptr, z_ptr, w0_ptr, w2_ptr, a0_ptr, a2_ptr, v0_ptr,
                     v2_ptr, g2_ptr, kk_ptr, ka_ptr, rk_ptr, gnw_ptr, gnb_ptr, gn_eps,
                     C: tl.constexpr, H: tl.constexpr, N: tl.constexpr,
                     RW: tl.constexpr, RA: tl.constexpr, RV: tl.constexpr, RG: tl.constexpr,
                     RWP: tl.constexpr, RAP: tl.constexpr, RVP: tl.constexpr, RGP: tl.constexpr,
                     FIRST: tl.constexpr, PDL: tl.constexpr):
    """One (head, batch row): everything between the projections and the output projection."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    dtype = z_ptr.dtype.element_ty
    j = tl.arange(0, N)
    ch = h * N + j
    # weights and this layer's state first: nothing earlier in the step writes them
    w2 = _lora_tile(w2_ptr, ch, C, RW, RWP)
    a2 = _lora_tile(a2_ptr, ch, C, RA, RAP)
    g2 = _lora_tile(g2_ptr, ch, C, RG, RGP)
    w0 = tl.load(w0_ptr + ch).to(tl.float32)
    a0 = tl.load(a0_ptr + ch).to(tl.float32)
    k_k = tl.load(kk_ptr + ch).to(tl.float32)
    k_a = tl.load(ka_ptr + ch).to(tl.float32)
    r_k = tl.load(rk_ptr + ch).to(tl.float32)
    gn_w = tl.load(gnw_ptr + ch).to(tl.float32)
    gn_b = tl.load(gnb_ptr + ch).to(tl.float32)
    at = state_ptr + (b * H + h) * N * N + j[:, None] * N + j[None, :]  # S [N_v, N_k], value-major (State.wkv)
    S = tl.load(at)
    if not FIRST:
        v2 = _lora_tile(v2_ptr, ch, C, RV, RVP)
        v0 = tl.load(v0_ptr + ch).to(tl.float32)
    _after_previous_kernel(PDL)

    rkv_ptr += b * 3 * C
    r = tl.load(rkv_ptr + ch).to(tl.float32)
    k = tl.load(rkv_ptr + C + ch).to(tl.float32)
    v = tl.load(rkv_ptr + 2 * C + ch).to(tl.float32)
    down_ptr += b * (RW + RA + RV + RG)
    w_raw = w0 + _lora_up(down_ptr, w2, RW, RWP, 1)
    a = tl.sigmoid(a0 + _lora_up(down_ptr + RW, a2, RA, RAP, 0))
    if FIRST:
        tl.store(vfirst_ptr + b * C + ch, v.to(dtype))
    else:
        gate = tl.sigmoid(v0 + _lora_up(down_ptr + RW + RA, v2, RV, RVP, 0))
        v_first = tl.load(vfirst_ptr + b * C + ch).to(tl.float32)
        v = v + (v_first - v) * gate
    g = _lora_up(down_ptr + RW + RA + RV, g2, RG, RGP, 2)

    kk = k * k_k
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, 0)), _NORMALIZE_EPS)
    k = k * (1.0 + (a - 1.0) * k_a)
    decay = tl.exp(tl.sigmoid(w_raw) * _LOG_DECAY_SCALE)

    removal = tl.sum(S * (-kk)[None, :], 1)
    S = S * decay[None, :] + removal[:, None] * (kk * a)[None, :] + v[:, None] * k[None, :]
    tl.store(at, S)
    y = tl.sum(S * r[None, :], 1)

    mean = tl.sum(y, 0) / N
    d = y - mean
    y = d / tl.sqrt(tl.sum(d * d, 0) / N + gn_eps)
    y = y * gn_w + gn_b + tl.sum(r * k * r_k, 0) * v  # GroupNorm, then the r_k bonus
    tl.store(z_ptr + b * C + ch, (y * g).to(dtype))


@triton.jit
def _proj_add_kernel(in_ptr, w_ptr, s_ptr, x_ptr, copy_src_ptr, copy_dst_ptr, C: tl.constexpr, K: tl.constexpr,
                     INT8: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """x[rows] += W[rows] @ in (W [C, K]); also copies copy_src[rows] to copy_dst[rows] (a token-shift state)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BN + tl.arange(0, BN)
    offs = tl.arange(0, BK)
    w = tl.load(w_ptr + rows[:, None] * K + offs[None, :], mask=(rows < C)[:, None] & (offs < K)[None, :], other=0.0)
    _after_previous_kernel(PDL)
    xin = tl.load(in_ptr + b * K + offs, mask=offs < K, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * xin[None, :]
    for k0 in range(BK, K, BK):
        offs = k0 + tl.arange(0, BK)
        inside = offs < K
        xin = tl.load(in_ptr + b * K + offs, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + offs[None, :], mask=(rows < C)[:, None] & inside[None, :], other=0.0)
        acc += w.to(tl.float32) * xin[None, :]
    dtype = x_ptr.dtype.element_ty
    out = _dequant(tl.sum(acc, 1), s_ptr, rows, rows < C, INT8)
    at = b * C + rows
    tl.store(x_ptr + at, (tl.load(x_ptr + at, mask=rows < C).to(tl.float32) + out).to(dtype), mask=rows < C)
    tl.store(copy_dst_ptr + at, tl.load(copy_src_ptr + at, mask=rows < C), mask=rows < C)


@triton.jit
def _ffn_in_kernel(x_ptr, prev_ptr, lnw_ptr, lnb_ptr, mix_ptr, w_ptr, s_ptr, h_ptr, xf_ptr, eps,
                   C: tl.constexpr, F: tl.constexpr, INT8: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   PDL: tl.constexpr):
    """h[rows] = relu(key[rows] @ mix(ln2(x)))^2 (key [F, C]); program 0 also stores ln2(x)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BN + tl.arange(0, BN)
    y = _ln_mix_dot(x_ptr + b * C, eps, lnw_ptr, lnb_ptr, prev_ptr + b * C, mix_ptr, w_ptr, rows, rows < F,
                    xf_ptr + b * C, pid == 0, C, C, 1, True, BN, BK, PDL)
    dtype = h_ptr.dtype.element_ty
    y = tl.maximum(_dequant(y, s_ptr, rows, rows < F, INT8), 0.0)
    tl.store(h_ptr + b * F + rows, (y * y).to(dtype), mask=rows < F)


@triton.jit
def _head_kernel(x_ptr, lnw_ptr, lnb_ptr, w_ptr, s_ptr, out_ptr, eps, C: tl.constexpr, V: tl.constexpr,
                 INT8: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """logits[rows] = head[rows] @ ln_out(x)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BN + tl.arange(0, BN)
    y = _ln_mix_dot(x_ptr + b * C, eps, lnw_ptr, lnb_ptr, x_ptr, x_ptr, w_ptr, rows, rows < V,
                    out_ptr, False, C, C, 1, False, BN, BK, PDL)
    y = _dequant(y, s_ptr, rows, rows < V, INT8)
    tl.store(out_ptr + b * V + rows, y.to(out_ptr.dtype.element_ty), mask=rows < V)


def _has_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: a CUDA GPU of compute capability 9 or later (the interpreter has none), and a
    triton with the gdc instructions and the launch option."""
    if device.type != "cuda" or gdc_wait is None or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    from triton.backends.nvidia.compiler import CUDAOptions

    return "launch_pdl" in CUDAOptions.__dataclass_fields__


class FusedStepV7:
    """`step(tokens [B, 1] long, state) -> logits [B, V]` for an RWKV-7 model, updating `state` in place.

    Reads the model's weights where they are (no copies): change them in place and the next step sees it.
    Takes fp16 / bf16 / fp32 models and models whose matrices `quantize_int8` made int8 (read as int8 bytes).
    The state must be this batch size's, contiguous, in the model's dtype (float32 WKV), as `model.zero_state`
    makes it. Scratch buffers are owned by the object, so one object serves one stream of steps at a time
    (the Decoder's CUDA graph records their addresses).
    """

    def __init__(self, model, batch_size: int, config: StepConfig = StepConfig()):
        cfg = model.config
        if cfg.version != "7":
            raise ConfigError(f"the fused step is for RWKV-7, this model is RWKV-{cfg.version}")
        emb = model.emb.weight
        check_triton_device(emb, "fused RWKV-7 step", "the model's own step")
        if cfg.head_size != triton.next_power_of_2(cfg.head_size):
            raise ConfigError(f"the fused step needs a power-of-two head size, got {cfg.head_size}")
        # the kernels index every weight as a plain row-major array
        strided = [name for name, p in model.named_parameters() if not p.is_contiguous()]
        if strided:
            raise ConfigError(f"the fused step reads weights in place and needs them contiguous: {strided[0]} is not "
                              "(e.g. after use_gemv_friendly_layout; call .contiguous() on it)")
        matrices = [model.head] + [m for b in model.blocks for m in (b.att.receptance, b.att.key, b.att.value,
                                                                      b.att.output, b.ffn.key, b.ffn.value)]
        int8 = {m.weight.dtype == torch.int8 and hasattr(m, "scale") for m in matrices}
        if len(int8) != 1:
            raise ConfigError("the fused step needs every matrix int8 (quantize_int8) or none")
        self.int8 = int8.pop()
        self.pdl = config.pdl and _has_pdl(emb.device)
        self.model, self.batch_size, self.config = model, batch_size, config
        self.C, self.F, self.H, self.N, self.V = cfg.n_embd, cfg.dim_ffn, cfg.n_head, cfg.head_size, cfg.vocab_size
        self.ranks = (cfg.w_lora, cfg.a_lora, cfg.v_lora, cfg.g_lora)

        def new(*shape):
            return torch.empty(*shape, device=emb.device, dtype=emb.dtype)

        B, C = batch_size, self.C
        self.x, self.xa, self.xf, self.z, self.v_first = (new(B, C) for _ in range(5))
        self.rkv, self.down, self.h = new(B, 3 * C), new(B, sum(self.ranks)), new(B, self.F)
        self.logits = new(B, self.V)

    def _scale(self, linear):
        """A matrix's int8 row scales, or (unused by the kernels) its weight."""
        return linear.scale if self.int8 else linear.weight

    def step(self, tokens: torch.Tensor, state) -> torch.Tensor:
        m, B, C, F, H, N, V = self.model, self.batch_size, self.C, self.F, self.H, self.N, self.V
        RW, RA, RV, RG = self.ranks
        q, scale, cfg, pdl = self.int8, self._scale, self.config, self.pdl
        launch = {"launch_pdl": True} if pdl else {}
        # input columns per load: at most the (power-of-two padded) input length
        cdiv, pow2 = triton.cdiv, triton.next_power_of_2
        ln_k, head_k = min(cfg.ln_in.k, pow2(C)), min(cfg.head.k, pow2(C))
        att_k, ffn_k = min(cfg.residual.k, pow2(C)), min(cfg.residual.k, pow2(F))
        rows, res_rows = cfg.ln_in.rows, cfg.residual.rows
        x = self.x
        ln0 = m.blocks[0].ln0
        _embed_kernel[(B,)](tokens, m.emb.weight, ln0.weight, ln0.bias, x, ln0.eps, C, ln_k)
        att_in_programs = 3 * cdiv(C, rows) + sum(cdiv(r, rows) for r in self.ranks)
        for i, block in enumerate(m.blocks):
            att, ffn, ln1, ln2 = block.att, block.ffn, block.ln1, block.ln2
            att_x, wkv, ffn_x = state.att_x[i], state.wkv[i], state.ffn_x[i]
            _att_in_kernel[(att_in_programs, B)](
                x, att_x, ln1.weight, ln1.bias, att.x_r, att.x_k, att.x_v, att.x_w, att.x_a, att.x_g,
                att.receptance.weight, att.key.weight, att.value.weight, scale(att.receptance), scale(att.key),
                scale(att.value), att.w1, att.a1, att.v1, att.g1, self.rkv, self.down, self.xa, ln1.eps,
                C, RW, RA, RV, RG, q, rows, ln_k, pdl, num_warps=cfg.ln_in.warps, **launch)
            _att_core_kernel[(H, B)](
                self.rkv, self.down, self.v_first, wkv, self.z, att.w0, att.w2, att.a0, att.a2, att.v0, att.v2,
                att.g2, att.k_k, att.k_a, att.r_k, att.ln_x.weight, att.ln_x.bias, att.ln_x.eps,
                C, H, N, RW, RA, RV, RG, *(pow2(r) for r in self.ranks), i == 0, pdl,
                num_warps=cfg.core_warps, **launch)
            _proj_add_kernel[(cdiv(C, res_rows), B)](
                self.z, att.output.weight, scale(att.output), x, self.xa, att_x, C, C, q, res_rows, att_k, pdl,
                num_warps=cfg.residual.warps, **launch)
            _ffn_in_kernel[(cdiv(F, rows), B)](
                x, ffn_x, ln2.weight, ln2.bias, ffn.x_k, ffn.key.weight, scale(ffn.key), self.h, self.xf, ln2.eps,
                C, F, q, rows, ln_k, pdl, num_warps=cfg.ln_in.warps, **launch)
            _proj_add_kernel[(cdiv(C, res_rows), B)](
                self.h, ffn.value.weight, scale(ffn.value), x, self.xf, ffn_x, C, F, q, res_rows, ffn_k, pdl,
                num_warps=cfg.residual.warps, **launch)
        _head_kernel[(cdiv(V, cfg.head.rows), B)](
            x, m.ln_out.weight, m.ln_out.bias, m.head.weight, scale(m.head), self.logits, m.ln_out.eps, C, V, q,
            cfg.head.rows, head_k, pdl, num_warps=cfg.head.warps, **launch)
        return self.logits
