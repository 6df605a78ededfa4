"""RWKV-7 WKV recurrence, one timestep at a time: the readable ground truth for every faster form."""

from __future__ import annotations

import torch


def wkv7_naive(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, with S [N_v, N_k]:  S_t = S_{t-1} (diag(exp w_t) + a_t b_t^T) + v_t k_t^T,  y_t = S_t r_t.

    r, w, k, a, b: [B, T, H, N_k]; v: [B, T, H, N_v]; w is the log of the decay (<= 0).
    Returns y [B, T, H, N_v] in r's dtype and the final state [B, H, N_v, N_k] in float32.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    out_dtype = r.dtype
    r, w, k, v, a, b = (x.float() for x in (r, w, k, v, a, b))
    if initial_state is None:
        S = r.new_zeros(B, H, V, K)
    else:
        S = initial_state.float()
    ys = []
    # unbind(1) rather than x[:, t]: autograd then stacks the per-step gradients once instead of scattering
    # each into a full-size zero tensor (quadratic in T)
    for r_t, decay_t, k_t, v_t, a_t, b_t in zip(*(x.unbind(1) for x in (r, w.exp(), k, v, a, b))):
        sa = S @ a_t.unsqueeze(-1)  # [B, H, V, 1]
        S = S * decay_t.unsqueeze(-2) + sa * b_t.unsqueeze(-2) + v_t.unsqueeze(-1) * k_t.unsqueeze(-2)
        ys.append((S @ r_t.unsqueeze(-1)).squeeze(-1))
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, V)
    return y.to(out_dtype), S
