"""The language-model loss: head matmul + cross-entropy + L2Wrap, fused and chunked over tokens.

L2Wrap (RWKV-LM) adds, in the backward pass only, a gradient that pulls the largest logit of every position towards 0:
it is the gradient of the auxiliary loss `1e-4 * sum_positions w_pos * max_v(logits)^2 / 2`, where `w_pos` is the
position's weight in the cross-entropy mean. The reported loss stays the plain cross-entropy. Like RWKV-LM's fused
kernel (and unlike its old autograd version) the extra gradient is scaled by the incoming gradient, so it stays
correct under gradient accumulation and loss scaling.

Computing the logits chunk by chunk means the full [tokens, vocab] logits tensor never exists; the gradient of
the head weight is accumulated in float32.

Masked losses (fine-tuning) pass per-token weights: mask / number of counted tokens.
"""

from __future__ import annotations

import torch

from rwkvkit.ops.cross_entropy import ce_grad_

L2WRAP_FACTOR = 1e-4


class _HeadCrossEntropy(torch.autograd.Function):
    """Forward computes the loss AND its gradients chunk by chunk (3 matmuls per chunk instead of the 4 of a
    recomputing backward); backward only scales them by the incoming gradient, which is exact because the
    loss is a scalar and both the cross-entropy and the L2Wrap gradients are linear in it."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weight, chunk, compute_dtype):
        n = hidden.shape[0]
        chunk = chunk if chunk > 0 else max(n, 1)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if want_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk].to(compute_dtype)
            t = targets[s : s + chunk]
            tw = token_weight[s : s + chunk]
            logits = h @ w.t()
            if not (want_h or want_w):
                x = logits.float()
                total = total + ((torch.logsumexp(x, -1) - x.gather(-1, t[:, None])[:, 0]) * tw).sum()
                continue
            total = total + ce_grad_(logits, t, tw, L2WRAP_FACTOR)
            g = logits  # now the gradient of the chunk's loss w.r.t. its logits
            if want_h:
                grad_hidden[s : s + chunk] = (g @ w).to(hidden.dtype)
            if want_w:
                _add_product_fp32(grad_weight, g.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if want_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_out.to(g.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_weight), None, None, None, None


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 acc and 16-bit a, b: on CUDA one cuBLAS call that adds into acc (torch's
    `out_dtype`), not a 16-bit product widened and then added (two more passes over a head-sized tensor per chunk)."""
    if acc.is_cuda and a.dtype != acc.dtype:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except TypeError:  # a torch without out_dtype
            pass
    acc += (a @ b).to(acc.dtype)


def lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
            mask: torch.Tensor | None = None, *, chunk: int = 4096,
            compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden [B,T,C] @ head_weight.T` against `targets [B,T]` (+ L2Wrap in backward).

    `mask [B,T]` (0/1 or weights) restricts the mean to the counted tokens; a batch with none counted gives 0.
    Targets < 0 (the usual -100 "ignore" label) are never counted.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    ignored = t < 0
    if ignored.any():
        keep = ~ignored if mask is None else mask.reshape(-1) * ~ignored
        mask, t = keep, t.clamp_min(0)
    if mask is None:
        token_weight = torch.full(t.shape, 1.0 / max(t.numel(), 1), device=h.device)
    else:
        m = mask.reshape(-1).float()
        token_weight = m / m.sum().clamp_min(1.0)
    dtype = compute_dtype or h.dtype
    return _HeadCrossEntropy.apply(h, head_weight, t, token_weight, chunk, dtype)


def reference_lm_loss(hidden, head_weight, targets, mask=None):
    """Plain-autograd equivalent of `lm_loss` (same value and gradients), for tests."""
    logits = (hidden @ head_weight.t()).float().reshape(-1, head_weight.shape[0])
    t = targets.reshape(-1)
    m = torch.ones_like(t, dtype=torch.float32) if mask is None else mask.reshape(-1).float()
    tw = m / m.sum().clamp_min(1.0)
    nll = torch.nn.functional.cross_entropy(logits, t, reduction="none")
    ce = (nll * tw).sum()
    aux = L2WRAP_FACTOR * (tw * logits.max(-1).values ** 2 / 2).sum()
    return ce + (aux - aux.detach())
