"""Helpers for checking WKV implementations against each other: error metric and realistic random inputs.

The input makers follow what the models feed the ops, so tests exercise the value ranges that matter
(v7: decay in (e^{-e^{-0.5}}, 1), a = -kk, b = kk * lr with |kk| = 1; v6: w = -exp(w_raw)).
"""

from __future__ import annotations

import torch

from rwkvkit.ops.wkv4.naive import wkv4_naive

V7_MIN_LOG_DECAY = -0.6065306597126334  # -exp(-0.5): the steepest per-step v7 decay, log form


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """rms(x - ref) / rms(ref), computed in float64 (0 when both are all zero)."""
    x, ref = x.detach().double(), ref.detach().double()
    scale = ref.pow(2).mean().sqrt()
    err = (x - ref).pow(2).mean().sqrt()
    return float(err / scale) if scale > 0 else float(err)


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


def wkv7_inputs(B, T, H, N, seed=0, log_decay_range=(V7_MIN_LOG_DECAY, 0.0), state_scale=0.5):
    """(r, w, k, v, a, b), initial_state: float32, shaped like an RWKV-7 layer's; w uniform in log_decay_range."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = _randn(g, B, T, H, N), _randn(g, B, T, H, N), _randn(g, B, T, H, N)
    lo, hi = log_decay_range
    w = lo + (hi - lo) * torch.rand(B, T, H, N, generator=g)
    kk = torch.nn.functional.normalize(_randn(g, B, T, H, N), dim=-1)
    a, b = -kk, kk * torch.sigmoid(_randn(g, B, T, H, N))
    return (r, w, k, v, a, b), _randn(g, B, H, N, N) * state_scale


def wkv6_inputs(B, T, H, N, seed=0, raw_decay_scale=1.0, raw_decay_shift=-2.0, state_scale=0.5):
    """(r, w, k, v, u), initial_state: w = -exp(w_raw), w_raw ~ shift + scale * normal.

    A large scale spreads the decays from ~0 (w very negative) to ~1 (w ~ 0).
    """
    g = torch.Generator().manual_seed(seed)
    r, k, v = _randn(g, B, T, H, N), _randn(g, B, T, H, N), _randn(g, B, T, H, N)
    w = -torch.exp(raw_decay_shift + raw_decay_scale * _randn(g, B, T, H, N))
    u = _randn(g, H, N) * 0.5
    return (r, w, k, v, u), _randn(g, B, H, N, N) * state_scale


def wkv4_inputs(B, T, C, seed=0, k_scale=1.0, decay_scale=1.0):
    """(w, u, k, v), initial_state: w = -exp(time_decay); the state comes from running 5 random tokens."""
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(decay_scale * _randn(g, C))
    u = _randn(g, C)
    k, v = k_scale * _randn(g, B, T, C), _randn(g, B, T, C)
    _, state = wkv4_naive(w, u, k_scale * _randn(g, B, 5, C), _randn(g, B, 5, C))
    return (w, u, k, v), state


def run_with_grads(fn, inputs, initial_state, dy, dstate):
    """fn(*inputs, initial_state) on fresh leaves; returns [y, final_state, grad of each input, grad of the state]."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    s0 = None if initial_state is None else initial_state.detach().clone().requires_grad_()
    y, s_final = fn(*leaves, s0)
    torch.autograd.backward((y, s_final), (dy, dstate))
    grads = [x.grad for x in leaves] + ([] if s0 is None else [s0.grad])
    return [y, s_final, *grads]


# packed-sequence tests: odd lengths, an empty sequence, a single token, one exactly a 16-token chunk
PACKED_LENGTHS = (5, 0, 37, 16, 1, 20)
