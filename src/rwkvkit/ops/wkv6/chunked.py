"""RWKV-5/6 WKV in chunked form: parallel inside chunks of `chunk_size` tokens, recurrent across chunks.

Per head (S [N_k, N_v]; S_0 the state at the chunk start), for token t of a chunk of L tokens:

    y_t = (r_t * exp(w_1 + ... + w_{t-1}))^T S_0 + sum_{s<t} A[t, s] v_s + (r_t . u . k_t) v_t
    A[t, s] = sum_i r_t[i] k_s[i] exp(w_{s+1} + ... + w_{t-1})[i]
    S_end = diag(exp(w_1 + ... + w_L)) S_0 + sum_s (k_s * exp(w_{s+1} + ... + w_L)) v_s^T

Numerics: v5/v6 log decays range from ~0 to very negative (-exp(w_raw): -20 and below in trained models), so the
usual factorisation A = (r e^{c}) (k e^{-c})^T with c the cumulative log decay would overflow e^{-c}. Instead the
pairs (t, s) are split along a binary tree over the chunk: every pair has exactly one level where s lies in the
left half and t in the right half of the same block, and there exp(w_{s+1} + ... + w_{t-1}) factors at the
boundary p between the halves into exp(w_{s+1} + ... + w_p) * exp(w_{p+1} + ... + w_{t-1}): two partial sums
inside a half-block, both <= 0. So every exponent is <= 0 (nothing overflows; what underflows is truly
negligible), each is a direct sum of the w's it spans (no cancellation between large cumulative sums), and each
level is a batched matmul. Exact for any w <= 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 16  # a power of two (the tree halves it); 16-64 are within 10% of each other on CPU


def wkv6_step(r, w, k, v, u, initial_state=None):
    """One token (T == 1), the RNN-mode decoding path: a handful of ops on the [B, H, N_k, N_v] state."""
    B, _, H, K = r.shape
    out_dtype = r.dtype
    r, w, k, v, u = (x[:, 0].float() if x.dim() == 4 else x.float() for x in (r, w, k, v, u))
    S = r.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.float()
    kv = k.unsqueeze(-1) * v.unsqueeze(-2)
    y = (r.unsqueeze(-2) @ (S + u.unsqueeze(-1) * kv)).squeeze(-2)
    S = w.exp().unsqueeze(-1) * S + kv
    return y.unsqueeze(1).to(out_dtype), S


def _exclusive_prefix_sum(x: torch.Tensor) -> torch.Tensor:
    """out[t] = x[0] + ... + x[t-1] along dim -2 (0 at t = 0)."""
    return F.pad(x[..., :-1, :].cumsum(-2), (0, 0, 1, 0))


def _exclusive_suffix_sum(x: torch.Tensor) -> torch.Tensor:
    """out[t] = x[t+1] + ... + x[L-1] along dim -2 (0 at t = L-1)."""
    return F.pad(x[..., 1:, :].flip(-2).cumsum(-2).flip(-2), (0, 0, 0, 1))


def _within_chunk(r, w, k, v):
    """sum_{s<t} A[t, s] v_s for chunks [..., L, N] (L a power of two), one binary-tree level at a time."""
    *lead, L, K = r.shape
    V = v.shape[-1]
    out = torch.zeros(*lead, L, V, dtype=v.dtype, device=v.device)

    def halves(x, half):  # [..., L, N] -> left and right halves of each block of 2*half: [..., L/(2 half), half, N]
        x = x.reshape(*lead, L // (2 * half), 2, half, x.shape[-1])
        return x[..., 0, :, :], x[..., 1, :, :]

    half = 1
    while half < L:
        (w_left, w_right), (k_left, _), (_, r_right), (v_left, _) = (halves(x, half) for x in (w, k, r, v))
        keys = k_left * _exclusive_suffix_sum(w_left).exp()  # decay from s+1 to the end of the left half
        queries = r_right * _exclusive_prefix_sum(w_right).exp()  # decay from the right half's start to t-1
        to_right = (queries @ keys.transpose(-1, -2)) @ v_left  # [..., L/(2 half), half, V]
        halves(out, half)[1].add_(to_right)
        half *= 2
    return out


def _chunks(r, w, k, v, u, S, L):
    """Tokens [B, n*L, H, N] (float32) in n chunks of L; S [B, H, N_k, N_v]. Returns y [B, n*L, H, N_v], S_end."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    n = T // L

    def split(x):  # [B, T, H, N] -> [n, B, H, L, N]: chunk-major, so each chunk's slice below is contiguous
        return x.reshape(B, n, L, H, x.shape[-1]).permute(1, 0, 3, 2, 4).contiguous()

    r, w, k, v = split(r), split(w), split(k), split(v)
    r_decayed = r * _exclusive_prefix_sum(w).exp()  # reads the chunk-start state
    k_decayed = k * _exclusive_suffix_sum(w).exp()  # writes into the chunk-end state
    chunk_decay = w.sum(-2).exp()  # [n, B, H, K]
    kv_chunk = k_decayed.transpose(-1, -2) @ v  # [n, B, H, K, V]

    # the scan; each chunk reads its start state right away, so the n states are never stacked in memory
    from_state = []
    for r_i, decay_i, kv_i in zip(r_decayed.unbind(0), chunk_decay.unbind(0), kv_chunk.unbind(0)):
        from_state.append(r_i @ S)
        S = torch.addcmul(kv_i, decay_i.unsqueeze(-1), S)

    bonus = (r * u[:, None, :] * k).sum(-1, keepdim=True)
    y = torch.stack(from_state) + _within_chunk(r, w, k, v) + bonus * v  # [n, B, H, L, V]
    return y.permute(1, 0, 3, 2, 4).reshape(B, T, H, V), S


def wkv6_chunked(r, w, k, v, u, initial_state=None, chunk_size: int = DEFAULT_CHUNK):
    """Same contract as `wkv6_naive`; exact for any w <= 0 (including very negative w, decay ~0)."""
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"wkv6 chunk_size must be a power of two, got {chunk_size}")
    B, T, H, K = r.shape
    if T == 1:
        return wkv6_step(r, w, k, v, u, initial_state)
    out_dtype = r.dtype
    r, w, k, v, u = (x.float() for x in (r, w, k, v, u))
    S = r.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.float()
    if T == 0:
        return r.new_zeros(B, 0, H, v.shape[-1]).to(out_dtype), S
    # short inputs use one chunk of the next power of two; padding with r = k = v = 0 and w = 0 (decay 1) adds
    # nothing to the state and leaves it undecayed, so the final state stays exact
    L = min(chunk_size, 1 << (T - 1).bit_length())
    pad = -T % L
    r, w, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, w, k, v))
    y, S = _chunks(r, w, k, v, u, S, L)
    return y[:, :T].to(out_dtype), S
