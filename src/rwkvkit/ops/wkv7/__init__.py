"""RWKV-7 WKV op: `wkv7(r, w, k, v, a, b, initial_state=None, impl="auto") -> (y, final_state)`."""

from __future__ import annotations

import torch

from rwkvkit.ops import require_triton_kernel, triton_kernel, wants_kernel
from rwkvkit.ops.varlen import check_cu_seqlens, per_sequence

from .chunked import wkv7_chunked, wkv7_step
from .naive import wkv7_naive

IMPLS = ("auto", "naive", "chunked", "triton")


def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    impl: str = "auto",
    log_decay_min: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = S_{t-1} (diag(exp w_t) + a_t b_t^T) + v_t k_t^T,  y_t = S_t r_t, per head.

    All per-token inputs [B, T, H, N]; w = log of the decay (<= 0). State [B, H, N_v, N_k] float32 (value-major,
    the official v7 layout). Returns y in r's dtype and the final state in float32. Inputs are never modified.
    impl: "auto" (a single-step path for T == 1, triton on CUDA from T = KERNEL_MIN_T (128) on, else
    chunked), "naive", "chunked" or "triton". log_decay_min: a lower bound of w that the caller guarantees, so
    that the Triton path need not find w's minimum (one wait for the GPU) to know its kernels can take it
    (`triton_chunk.wkv7_triton`); the model passes -e^{-0.5}.
    cu_seqlens: [N + 1] starts of N sequences packed into one row [1, T_total, H, N], each with its own initial
    and final state ([N, H, N_v, N_k]); see `rwkvkit.ops.varlen`. The kernels take them in one launch, the
    PyTorch paths one sequence at a time.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown wkv7 impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        # short sequences stay on the PyTorch path (`wants_kernel`); one token takes its plain step, which
        # torch.compile fuses into the decoder's layer step
        kernel = triton_kernel("wkv7") if wants_kernel(r) else None
        if kernel is not None:
            return kernel(r, w, k, v, a, b, initial_state, log_decay_min=log_decay_min, cu_seqlens=cu_seqlens)
        impl = "chunked"  # which itself takes the single-step path when T == 1
    if impl == "triton":
        return require_triton_kernel("wkv7")(r, w, k, v, a, b, initial_state, log_decay_min=log_decay_min,
                                             cu_seqlens=cu_seqlens)
    fn = wkv7_naive if impl == "naive" else wkv7_chunked
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, r, initial_state)
        return per_sequence(fn, cu_seqlens, (r, w, k, v, a, b), initial_state)
    return fn(r, w, k, v, a, b, initial_state)


__all__ = ["wkv7", "wkv7_naive", "wkv7_chunked", "wkv7_step", "IMPLS"]
