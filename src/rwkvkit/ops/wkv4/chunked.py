"""RWKV-4 WKV in chunked form: parallel inside chunks of `chunk_size` tokens, recurrent across chunks.

Each output is a weighted average y_t = sum_j e^{E_tj} v_j / sum_j e^{E_tj} over three kinds of terms:
past tokens of the chunk (E = k_i + (t-1-i) w, i < t), the current token (E = u + k_t) and the chunk-start state
(E = pp + t w, weights aa and bb). k can be large (30+) and w very negative, so every output subtracts its own
maximum exponent m_t before exponentiating (log-space, max per step, like the official kernel). The pair
exponents are formed directly, never as differences of large cumulative sums. Since y_t does not depend on m_t,
m_t is detached: no gradient needs to flow through the max.

Across chunks the state (aa, bb, pp) is carried exactly as the official recurrence carries it: the chunk's own
contribution (its max exponent p and the sums a, b scaled by e^{-p}) is merged with the state decayed by L steps.
"""

from __future__ import annotations

import torch

from .naive import empty_state

DEFAULT_CHUNK = 4  # fastest on CPU for C = 768 (pair tensors are [L, L, C] per chunk)


def wkv4_step(w, u, k, v, initial_state=None):
    """One token (T == 1), the RNN-mode decoding path (the official max-trick update)."""
    B, _, C = k.shape
    out_dtype = k.dtype
    w, u, k, v = w.float(), u.float(), k[:, 0].float(), v[:, 0].float()
    state = empty_state(B, C, k.device) if initial_state is None else initial_state.float()
    aa, bb, pp = state.unbind(1)
    q = torch.maximum(pp, u + k)
    e1, e2 = torch.exp(pp - q), torch.exp(u + k - q)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    q = torch.maximum(pp + w, k)
    e1, e2 = torch.exp(pp + w - q), torch.exp(k - q)
    state = torch.stack((e1 * aa + e2 * v, e1 * bb + e2, q), dim=1)
    return y.unsqueeze(1).to(out_dtype), state


def _chunks(w, u, k, v, state, L):
    """Tokens [B, n*L, C] (float32) in n chunks of L; state [B, 3, C]. Returns y [B, n*L, C] and the final state."""
    B, T, C = k.shape
    n = T // L
    k, v = k.reshape(B, n, L, C), v.reshape(B, n, L, C)
    pos = torch.arange(L, device=k.device, dtype=k.dtype)

    # chunk summaries from an empty state: exponents k_i + (L-1-i) w
    f = k + (L - 1 - pos)[:, None] * w
    p_loc = f.amax(-2)  # [B, n, C]
    e = torch.exp(f - p_loc.unsqueeze(-2))
    a_loc, b_loc = (e * v).sum(-2), e.sum(-2)

    aa, bb, pp = state.unbind(1)
    starts = []
    # unbind, not p_loc[:, i]: one backward stack instead of n full-size scatters
    for p_i, a_i, b_i in zip(p_loc.unbind(1), a_loc.unbind(1), b_loc.unbind(1)):
        starts.append(torch.stack((aa, bb, pp)))
        decayed = pp + L * w
        q = torch.maximum(decayed, p_i)
        e1, e2 = torch.exp(decayed - q), torch.exp(p_i - q)
        aa, bb, pp = e1 * aa + e2 * a_i, e1 * bb + e2 * b_i, q
    aa0, bb0, pp0 = torch.stack(starts, dim=2).unbind(0)  # each [B, n, C]

    # pair exponents E[t, i] = k_i + (t-1-i) w for i < t
    gap = (pos[:, None] - 1 - pos[None, :])[..., None]  # [L(t), L(i), 1]
    past = torch.ones(L, L, dtype=torch.bool, device=k.device).tril(-1)[..., None]
    E = torch.where(past, k.unsqueeze(-3) + gap * w, float("-inf"))  # [B, n, L, L, C]
    E_now = u + k  # [B, n, L, C]
    E_state = pp0.unsqueeze(-2) + pos[:, None] * w  # [B, n, L, C]
    m = torch.maximum(torch.maximum(E.amax(-2), E_now), E_state).detach()
    p = torch.exp(E - m.unsqueeze(-2))
    p_now, p_state = torch.exp(E_now - m), torch.exp(E_state - m)
    num = (p * v.unsqueeze(-3)).sum(-2) + p_now * v + p_state * aa0.unsqueeze(-2)
    den = p.sum(-2) + p_now + p_state * bb0.unsqueeze(-2)
    return (num / den).reshape(B, T, C), torch.stack((aa, bb, pp), dim=1)


def wkv4_chunked(w, u, k, v, initial_state=None, chunk_size: int = DEFAULT_CHUNK):
    """Same contract as `wkv4_naive`."""
    B, T, C = k.shape
    if T == 1:
        return wkv4_step(w, u, k, v, initial_state)
    out_dtype = k.dtype
    w, u, k, v = (x.float() for x in (w, u, k, v))
    state = empty_state(B, C, k.device) if initial_state is None else initial_state.float()
    # full chunks first, then the remainder as one shorter chunk (no padding, so the final state is exact)
    n_full = T // chunk_size * chunk_size
    ys = []
    for lo, hi in ((0, n_full), (n_full, T)):
        if hi > lo:
            y, state = _chunks(w, u, k[:, lo:hi], v[:, lo:hi], state, min(chunk_size, hi - lo))
            ys.append(y)
    y = torch.cat(ys, dim=1) if ys else k.new_zeros(B, 0, C)
    return y.to(out_dtype), state
