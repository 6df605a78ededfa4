"""Cross-entropy + L2Wrap gradient of one chunk of logits, in plain PyTorch (the reference for the kernel)."""

from __future__ import annotations

import torch


def ce_grad_naive(logits: torch.Tensor, targets: torch.Tensor, token_weight: torch.Tensor, l2wrap: float):
    """Overwrite `logits [n, V]` with d(loss)/d(logits) and return the loss (float32 scalar).

    loss = sum_i tw_i * (logsumexp(x_i) - x_i[t_i]); the gradient also carries L2Wrap's extra term
    l2wrap * tw_i * max(x_i) at the row's largest logit (the gradient of l2wrap * tw * max^2 / 2, which is not
    added to the returned loss). Rows are computed in float32 whatever the logits' dtype.
    """
    x = logits.float()
    t = targets[:, None]
    tw = token_weight[:, None].float()
    lse = torch.logsumexp(x, -1, keepdim=True)
    loss = ((lse - x.gather(-1, t)) * tw).sum()
    top, top_idx = x.max(-1, keepdim=True)
    g = x.sub_(lse).exp_()  # softmax, in place (x is a float32 copy, or the logits themselves)
    g.scatter_add_(-1, t, -torch.ones_like(tw))
    g.mul_(tw)
    g.scatter_add_(-1, top_idx, top * (l2wrap * tw))
    if g is not logits:
        logits.copy_(g)
    return loss
