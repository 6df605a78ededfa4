"""Cross-entropy + L2Wrap over a chunk of logits, gradient written in place: `ce_grad_(logits, ...) -> loss`."""

from __future__ import annotations

import torch

from rwkvkit.ops import require_triton_kernel, triton_kernel

from .naive import ce_grad_naive

IMPLS = ("auto", "naive", "triton")
_KERNEL = ("triton_fused", "ce_grad_triton")


def ce_grad_(logits: torch.Tensor, targets: torch.Tensor, token_weight: torch.Tensor, l2wrap: float,
             impl: str = "auto") -> torch.Tensor:
    """Overwrite `logits [n, V]` with the gradient of sum_i tw_i * CE_i (+ L2Wrap's term), return that sum.

    impl: "auto" (the Triton kernel on CUDA when available), "naive" or "triton".
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown cross-entropy impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        kernel = triton_kernel("cross_entropy", *_KERNEL) if logits.is_cuda else None
        return (kernel or ce_grad_naive)(logits, targets, token_weight, l2wrap)
    if impl == "triton":
        return require_triton_kernel("cross_entropy", *_KERNEL)(logits, targets, token_weight, l2wrap)
    return ce_grad_naive(logits, targets, token_weight, l2wrap)


__all__ = ["ce_grad_", "ce_grad_naive", "IMPLS"]
