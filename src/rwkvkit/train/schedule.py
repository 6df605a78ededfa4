"""RWKV-LM's learning-rate schedule: cosine by tokens from lr_init to lr_final, with a multiplicative warmup.

Unlike RWKV-LM, warmup counts optimizer steps since the start of the run (not of the process), so a resumed run
does not warm up again: a resume continues exactly where the interrupted run was.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, tokens_per_step: int, exit_tokens: int, lr_init: float, lr_final: float,
          warmup_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based), computed from the tokens seen before that step."""
    tokens = step * tokens_per_step
    warmup_tokens = max(warmup_steps, 0) * tokens_per_step
    span = exit_tokens - warmup_tokens
    progress = 1.0 if span <= 0 else min(max((tokens - warmup_tokens) / span, 0.0), 1.0)
    if lr_init == lr_final:
        lr = lr_init
    elif lr_init == 0.0:
        lr = lr_final * progress  # the ratio below is undefined: fall back to a straight line, as RWKV-LM does
    else:
        f = lr_final / lr_init
        lr = lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    if step < warmup_steps:
        lr *= 0.01 + 0.99 * step / warmup_steps
    return lr
