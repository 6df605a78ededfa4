"""RWKV-4 WKV op: `wkv4(w, u, k, v, initial_state=None, impl="auto", cu_seqlens=None) -> (y, final_state)`."""

from __future__ import annotations

import torch

from rwkvkit.ops import require_triton_kernel, triton_kernel, wants_kernel
from rwkvkit.ops.varlen import check_cu_seqlens, per_sequence

from .chunked import wkv4_chunked, wkv4_step
from .naive import EMPTY_PP, empty_state, wkv4_naive

IMPLS = ("auto", "naive", "chunked", "triton")


def wkv4(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    impl: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel weighted average of past values with decay w and a bonus u for the current token.

    w = -exp(time_decay) [C], u = time_first [C], k, v [B, T, C]. State [B, 3, C] float32 = (aa, bb, pp), the
    empty state having pp = -1e38. Returns y in k's dtype and the final state. Inputs are never modified.
    impl: "auto" (a single-step path for T == 1, the chunk-parallel Triton scan of triton_chunk.py on CUDA from
    T = KERNEL_MIN_T (128) on, else chunked), "naive", "chunked" or "triton".
    cu_seqlens: [N + 1] starts of N sequences packed into one row [1, T_total, C], each with its own initial and
    final state ([N, 3, C]; `rwkvkit.ops.varlen`). The Triton kernel runs them in one launch per pass, the others
    one sequence at a time.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown wkv4 impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        kernel = triton_kernel("wkv4") if wants_kernel(k) else None
        if kernel is not None:
            return kernel(w, u, k, v, initial_state, cu_seqlens=cu_seqlens)
    if impl == "triton":
        return require_triton_kernel("wkv4")(w, u, k, v, initial_state, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, k, initial_state)
        return per_sequence(lambda k, v, s0: wkv4(w, u, k, v, s0, impl), cu_seqlens, (k, v), initial_state)
    if impl == "naive":
        return wkv4_naive(w, u, k, v, initial_state)
    return wkv4_chunked(w, u, k, v, initial_state)  # which itself takes the single-step path when T == 1


__all__ = ["wkv4", "wkv4_naive", "wkv4_chunked", "wkv4_step", "empty_state", "EMPTY_PP", "IMPLS"]
