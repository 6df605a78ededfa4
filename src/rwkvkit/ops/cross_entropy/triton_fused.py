"""The chunk loss of `rwkvkit.train.loss` in one Triton kernel: 2 reads and 1 write of the logits.

One program per row: pass 1 keeps a running max (and its first index, for L2Wrap) and the running sum of
exponentials; pass 2 writes the gradient over the logits. The PyTorch sequence it replaces (naive.py) makes about
eight float32 passes over a [4096, 65536] chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rwkvkit.ops import check_triton_device


@triton.jit
def _ce_grad_kernel(x_ptr, t_ptr, tw_ptr, loss_ptr, V, stride, l2wrap, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    m = -float("inf")
    s = 0.0
    top_idx = 0
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32)
        block_max = tl.max(x, 0)
        if block_max > m:  # strict: the first maximum wins, as in a left-to-right scan
            top_idx = start + tl.argmax(x, 0)
        new_m = tl.maximum(m, block_max)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
        m = new_m
    lse = m + tl.log(s)
    t = tl.load(t_ptr + row)
    tw = tl.load(tw_ptr + row)
    x_t = tl.load(base + t).to(tl.float32)
    tl.store(loss_ptr + row, (lse - x_t) * tw)
    for start in range(0, V, BLOCK):
        idx = start + cols
        inside = idx < V
        x = tl.load(base + idx, mask=inside, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * tw
        g = tl.where(idx == t, g - tw, g)
        g = tl.where(idx == top_idx, g + l2wrap * m * tw, g)
        tl.store(base + idx, g.to(x_ptr.dtype.element_ty), mask=inside)


def ce_grad_triton(logits: torch.Tensor, targets: torch.Tensor, token_weight: torch.Tensor, l2wrap: float,
                   block: int = 4096):
    """Same contract as `ce_grad_naive`: `logits [n, V]` (row-contiguous) becomes the gradient; returns the loss."""
    n, V = logits.shape
    check_triton_device(logits, "cross-entropy kernel", "naive")
    if logits.stride(1) != 1:
        raise ValueError("ce_grad_triton needs rows with unit stride")
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        block = min(block, triton.next_power_of_2(V))
        _ce_grad_kernel[(n,)](logits, targets.contiguous(), token_weight.float().contiguous(), losses, V,
                              logits.stride(0), float(l2wrap), BLOCK=block, num_warps=8)
    return losses.sum()
