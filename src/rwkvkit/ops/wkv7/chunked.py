"""RWKV-7 WKV in chunked (WY) form: parallel inside chunks of `chunk_size` tokens, recurrent across chunks.

Derivation, per head and chunk (S [N_v, N_k] value-major, S_0 the state at the chunk start, c_t = w_1 + ... + w_t,
G_t = diag(exp c_t)). Write u_t = S_{t-1} a_t, so that S_t = S_{t-1} diag(e^{w_t}) + u_t b_t^T + v_t k_t^T and

    S_t = S_0 G_t + sum_{s<=t} (u_s b_s^T + v_s k_s^T) G_t G_s^{-1}.

Stacking tokens as rows (U = [u_t^T], V = [v_t^T], ...) and letting ã_t = a_t e^{c_{t-1}}, r̃_t = r_t e^{c_t},
b̌_s = b_s e^{-c_s}, ǩ_s = k_s e^{-c_s}, b̂_s = b_s e^{c_L - c_s}, k̂_s = k_s e^{c_L - c_s}:

    U = Ã S_0^T + A_ab U + A_ak V        A_ab = strict_tril(Ã B̌^T), A_ak = strict_tril(Ã Ǩ^T)
    Y = R̃ S_0^T + A_rb U + A_rk V        A_rb = tril(R̃ B̌^T),        A_rk = tril(R̃ Ǩ^T)
    S_L = S_0 G_L + U^T B̂ + V^T K̂

The first line is a unit lower-triangular system: with W = (I - A_ab)^{-1} Ã and Z = (I - A_ab)^{-1} A_ak V
(one triangular solve per chunk, all chunks at once), U = W S_0^T + Z, hence

    S_L = S_0 M + C,  M = G_L + W^T B̂,  C = Z^T B̂ + V^T K̂
    Y   = Q S_0^T + Y_0,  Q = R̃ + A_rb W,  Y_0 = A_rb Z + A_rk V

so the only sequential work is the scan S <- S M + C, one small matmul per chunk.

Numerics: b̌, ǩ carry e^{-c_s} <= e^{L * max|w|}. v7 log decays lie in (-0.61, 0), so a chunk of 64 stays below
e^{39}, far from float32 overflow; the products ã.b̌ etc. are the true, bounded pair weights. For inputs outside
that range the chunk is shortened until L * max|w| <= MAX_EXPONENT, down to single steps (a plain loop), so the
result stays exact for any w <= 0, only slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 32
MAX_EXPONENT = 40.0


def wkv7_step(r, w, k, v, a, b, initial_state=None):
    """One token (T == 1), the RNN-mode decoding path: a handful of ops on the [B, H, N_v, N_k] state."""
    B, _, H, K = r.shape
    out_dtype = r.dtype
    r, w, k, v, a, b = (x[:, 0].float() for x in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, v.shape[-1], K) if initial_state is None else initial_state.float()
    sa = S @ a.unsqueeze(-1)  # [B, H, V, 1]
    S = S * w.exp().unsqueeze(-2) + sa * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
    y = (S @ r.unsqueeze(-1)).squeeze(-1)
    return y.unsqueeze(1).to(out_dtype), S


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I - A)^{-1} for strictly lower-triangular A [..., L, L], by block forward substitution.

    The diagonal blocks of the inverse double in size each round: with X1, X2 the inverses of the two halves of a
    block, the inverse of [[I - A11, 0], [-A21, I - A22]] is [[X1, 0], [X2 A21 X1, X2]]. log2(L) rounds of batched
    matmuls instead of a per-matrix LAPACK solve (slow for many tiny matrices on CPU); unlike a Neumann series
    there is no cancellation between large terms.
    """
    L = A.shape[-1]
    size = 1 << max(L - 1, 0).bit_length()  # pad to a power of two: zero rows/cols extend the inverse by I
    A = F.pad(A, (0, size - L, 0, size - L))
    lead = A.shape[:-2]
    X = torch.ones(*lead, size, 1, 1, dtype=A.dtype, device=A.device)  # diagonal blocks, [..., nb, s, s]
    s = 1
    while s < size:
        nb = size // (2 * s)
        # sub-diagonal s x s block of each 2s x 2s diagonal block of A
        A21 = A.reshape(*lead, nb, 2 * s, nb, 2 * s).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)[..., s:, :s]
        X1, X2 = X[..., 0::2, :, :], X[..., 1::2, :, :]
        top = torch.cat((X1, torch.zeros_like(X1)), -1)
        bottom = torch.cat((X2 @ A21 @ X1, X2), -1)
        X = torch.cat((top, bottom), -2)
        s *= 2
    return X.reshape(*lead, size, size)[..., :L, :L]


class _SolveUnitLower(torch.autograd.Function):
    """X = (I - A)^{-1} R for strictly lower-triangular A, with the explicit inverse reused in backward."""

    @staticmethod
    def forward(ctx, A, R):
        inv = _unit_lower_inverse(A)
        X = inv @ R
        ctx.save_for_backward(inv, X)
        return X

    @staticmethod
    def backward(ctx, dX):
        inv, X = ctx.saved_tensors
        dR = inv.transpose(-1, -2) @ dX
        dA = (dR @ X.transpose(-1, -2)).tril(-1)
        return dA, dR


def _chunks(r, w, k, v, a, b, S, L):
    """Tokens [B, n*L, H, N] (float32) in n chunks of L; S [B, H, N_v, N_k]. Returns y [B, n*L, H, N_v], S_end."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    n = T // L

    def split(x):  # [B, T, H, N] -> [n, B, H, L, N]: chunk-major, so each chunk's slice below is contiguous
        return x.reshape(B, n, L, H, x.shape[-1]).permute(1, 0, 3, 2, 4).contiguous()

    r, w, k, v, a, b = (split(x) for x in (r, w, k, v, a, b))
    c = w.cumsum(-2)  # inclusive: c_t
    c_prev = F.pad(c[..., :-1, :], (0, 0, 1, 0))  # c_{t-1}
    # exponent c_L - c_s as a direct sum of the later w's (no cancellation of two cumulative sums)
    to_end = F.pad(w[..., 1:, :].flip(-2).cumsum(-2).flip(-2), (0, 0, 0, 1))

    a_dec = a * c_prev.exp()
    r_dec = r * c.exp()
    inv = (-c).exp()
    b_inv, k_inv = b * inv, k * inv
    b_end, k_end = b * to_end.exp(), k * to_end.exp()

    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    causal = torch.ones(L, L, dtype=torch.bool, device=r.device).tril()
    A_ab = (a_dec @ b_inv.transpose(-1, -2)).masked_fill(~strict, 0.0)
    A_ak = (a_dec @ k_inv.transpose(-1, -2)).masked_fill(~strict, 0.0)
    A_rb = (r_dec @ b_inv.transpose(-1, -2)).masked_fill(~causal, 0.0)
    A_rk = (r_dec @ k_inv.transpose(-1, -2)).masked_fill(~causal, 0.0)

    WZ = _SolveUnitLower.apply(A_ab, torch.cat((a_dec, A_ak @ v), -1))
    W, Z = WZ[..., :K], WZ[..., K:]

    M = torch.diag_embed(c[..., -1, :].exp()) + W.transpose(-1, -2) @ b_end  # [n, B, H, K, K]
    C = Z.transpose(-1, -2) @ b_end + v.transpose(-1, -2) @ k_end  # [n, B, H, V, K]
    Q = r_dec + A_rb @ W
    Y0 = A_rb @ Z + A_rk @ v

    # the scan; each chunk reads its start state right away, so the n states are never stacked in memory
    # (unbind, not M[i]: autograd then stacks the gradients once instead of n full-size scatters)
    ys = []
    for Q_i, Y0_i, M_i, C_i in zip(Q.unbind(0), Y0.unbind(0), M.unbind(0), C.unbind(0)):
        ys.append(torch.baddbmm(Y0_i.flatten(0, 1), Q_i.flatten(0, 1), S.flatten(0, 1).transpose(-1, -2)))
        S = torch.baddbmm(C_i.flatten(0, 1), S.flatten(0, 1), M_i.flatten(0, 1)).view_as(S)
    y = torch.stack(ys).view(n, B, H, L, V)
    return y.permute(1, 0, 3, 2, 4).reshape(B, T, H, V), S


def wkv7_chunked(r, w, k, v, a, b, initial_state=None, chunk_size: int = DEFAULT_CHUNK):
    """Same contract as `wkv7_naive`."""
    B, T, H, K = r.shape
    if T == 1:
        return wkv7_step(r, w, k, v, a, b, initial_state)
    out_dtype = r.dtype
    r, w, k, v, a, b = (x.float() for x in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, v.shape[-1], K) if initial_state is None else initial_state.float()
    L = chunk_size
    if T > 0:
        steepest = float(-w.detach().min())
        while L > 1 and L * steepest > MAX_EXPONENT:
            L //= 2
    if L == 1:  # decays too steep for any chunk: plain recurrence
        ys = []
        for t in range(T):
            y, S = wkv7_step(*(x[:, t : t + 1] for x in (r, w, k, v, a, b)), S)
            ys.append(y)
        return torch.cat(ys, dim=1).to(out_dtype), S
    # full chunks first, then the remainder as one shorter chunk (no padding, so the final state is exact)
    n_full = T // L * L
    ys = []
    for lo, hi in ((0, n_full), (n_full, T)):
        if hi > lo:
            part = (x[:, lo:hi] for x in (r, w, k, v, a, b))
            y, S = _chunks(*part, S, min(L, hi - lo))
            ys.append(y)
    y = torch.cat(ys, dim=1) if ys else r.new_zeros(B, 0, H, v.shape[-1])
    return y.to(out_dtype), S
