"""RWKV-4 WKV recurrence, one timestep at a time, in the max-subtracted (aa, bb, pp) form of the official kernel."""

from __future__ import annotations

import torch

# pp of an empty state: exp(pp - anything realistic) underflows to exactly 0, so aa/bb never contribute.
EMPTY_PP = -1e38


def empty_state(batch: int, channels: int, device=None) -> torch.Tensor:
    """The wkv4 state before any token: aa = bb = 0, pp = -1e38; [B, 3, C] float32."""
    state = torch.zeros(batch, 3, channels, device=device, dtype=torch.float32)
    state[:, 2] = EMPTY_PP
    return state


def wkv4_naive(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (same with v = 1), per channel.

    w = -exp(time_decay) [C], u = time_first [C], k, v [B, T, C].
    The state (aa, bb, pp) holds numerator and denominator scaled by e^{-pp}, pp being the running max exponent.
    Returns y [B, T, C] in k's dtype and the final state [B, 3, C] float32.
    """
    B, T, C = k.shape
    out_dtype = k.dtype
    w, u, k, v = (x.float() for x in (w, u, k, v))
    state = empty_state(B, C, k.device) if initial_state is None else initial_state.float()
    aa, bb, pp = state.unbind(1)
    ys = []
    # unbind(1) rather than k[:, t]: autograd then stacks the per-step gradients once (not quadratic in T)
    for kt, vt in zip(k.unbind(1), v.unbind(1)):
        q = torch.maximum(pp, u + kt)
        e1, e2 = torch.exp(pp - q), torch.exp(u + kt - q)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        q = torch.maximum(pp + w, kt)
        e1, e2 = torch.exp(pp + w - q), torch.exp(kt - q)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, q
    y = torch.stack(ys, dim=1) if ys else k.new_zeros(B, 0, C)
    return y.to(out_dtype), torch.stack((aa, bb, pp), dim=1)
