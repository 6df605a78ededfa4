"""RWKV-5/6 WKV op: `wkv6(r, w, k, v, u, initial_state=None, impl="auto") -> (y, final_state)`."""

from __future__ import annotations

import torch

from rwkvkit.ops import require_triton_kernel, triton_kernel, wants_kernel
from rwkvkit.ops.varlen import check_cu_seqlens, per_sequence

from .chunked import wkv6_chunked, wkv6_step
from .naive import wkv6_naive

IMPLS = ("auto", "naive", "chunked", "triton")


def check_log_decay_shape(r: torch.Tensor, w: torch.Tensor) -> None:
    """w per token (r's shape) or time-constant ([H, N]); else a ValueError (an [H, N] the kernels would misread)."""
    if tuple(w.shape) not in (tuple(r.shape), tuple(r.shape[2:])):
        raise ValueError(f"wkv6: w must be [B, T, H, N] like r {tuple(r.shape)} or [H, N] {tuple(r.shape[2:])} "
                         f"(time-constant, RWKV-5), got {tuple(w.shape)}")


def wkv6(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    impl: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),  S_t = diag(exp w_t) S_{t-1} + k_t v_t^T, per head.

    All per-token inputs [B, T, H, N]; w = log of the decay (<= 0), u = bonus [H, N]. RWKV-5's decay does not depend
    on the token: it passes w as [H, N] (the kernels then read each chunk's decays from that row, and its gradient
    is [H, N]).
    State [B, H, N_k, N_v] float32 (key-major, the official v5/v6 layout). Returns y in r's dtype and the final
    state in float32. Inputs are never modified.
    impl: "auto" (a single-step path for T == 1, triton on CUDA from T = KERNEL_MIN_T (128) on, else
    chunked), "naive", "chunked" or "triton".
    cu_seqlens: [N + 1] starts of N sequences packed into one row [1, T_total, H, N], each with its own initial
    and final state ([N, H, N_k, N_v]); see `rwkvkit.ops.varlen`.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown wkv6 impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        # short sequences stay on the PyTorch path (`wants_kernel`); one token takes its plain step, which
        # torch.compile fuses into the decoder's layer step
        kernel = triton_kernel("wkv6") if wants_kernel(r) else None
        if kernel is not None:
            return kernel(r, w, k, v, u, initial_state, cu_seqlens=cu_seqlens)
        impl = "chunked"  # which itself takes the single-step path when T == 1
    if impl == "triton":
        return require_triton_kernel("wkv6")(r, w, k, v, u, initial_state, cu_seqlens=cu_seqlens)
    check_log_decay_shape(r, w)  # (the kernels check it themselves)
    if w.dim() == 2:  # time-constant (RWKV-5): the PyTorch paths take it per token, as a view
        w = w.expand(r.shape)
    fn = wkv6_naive if impl == "naive" else wkv6_chunked
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, r, initial_state)
        return per_sequence(lambda r, w, k, v, s0: fn(r, w, k, v, u, s0), cu_seqlens, (r, w, k, v), initial_state)
    return fn(r, w, k, v, u, initial_state)


__all__ = ["wkv6", "wkv6_naive", "wkv6_chunked", "wkv6_step", "check_log_decay_shape", "IMPLS"]
