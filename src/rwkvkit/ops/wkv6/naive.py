"""RWKV-5/6 WKV recurrence, one timestep at a time: the readable ground truth for every faster form."""

from __future__ import annotations

import torch


def wkv6_naive(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, S [N_k, N_v]:  y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),  S_t = diag(e^{w_t}) S_{t-1} + k_t v_t^T.

    r, w, k: [B, T, H, N_k]; v: [B, T, H, N_v]; u: [H, N_k]; w is the log of the decay (<= 0).
    Returns y [B, T, H, N_v] in r's dtype and the final state [B, H, N_k, N_v] in float32.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    out_dtype = r.dtype
    r, w, k, v, u = (x.float() for x in (r, w, k, v, u))
    if initial_state is None:
        S = r.new_zeros(B, H, K, V)
    else:
        S = initial_state.float()
    bonus = u[None, :, :, None]  # [1, H, K, 1]
    ys = []
    # unbind(1) rather than x[:, t]: autograd then stacks the per-step gradients once instead of scattering
    # each into a full-size zero tensor (quadratic in T)
    for r_t, decay_t, k_t, v_t in zip(*(x.unbind(1) for x in (r, w.exp(), k, v))):
        kv = k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # [B, H, K, V]
        ys.append((r_t.unsqueeze(-2) @ (S + bonus * kv)).squeeze(-2))
        S = decay_t.unsqueeze(-1) * S + kv
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, V)
    return y.to(out_dtype), S
