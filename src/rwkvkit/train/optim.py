"""AdamW with RWKV-LM's parameter groups, decided by parameter name (names are the official checkpoint keys).

- weight decay only on 2-D `.weight` matrices (embedding, head, projections); never on vectors, LayerNorms, the
  v7 LoRA-style mini-matrices (w1..g2, whose names have no `.weight`) or the decay/mix vectors;
- per-parameter LR scales: the decay parameters learn 2x faster (v7 `att.w0`, v4/v5/v6 `att.time_decay`), the
  v4 bonus `att.time_first` 3x.

Frozen parameters (`requires_grad=False`) are left out, so fine-tuning selects what trains by freezing the rest.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

LR_SCALES = {"att.w0": 2.0, "att.time_decay": 2.0, "att.time_first": 3.0}


def lr_scale(name: str) -> float:
    for suffix, scale in LR_SCALES.items():
        if name.endswith(suffix):
            return scale
    return 1.0


def wants_weight_decay(name: str, p: torch.Tensor) -> bool:
    return ".weight" in name and p.squeeze().dim() >= 2


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 scale_fn: Callable[[str], float] = lr_scale) -> list[dict]:
    """Groups keyed by (lr_scale, weight_decay), in first-seen order so the optimizer state maps back stably."""
    groups: dict[tuple[float, float], dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        wd = weight_decay if weight_decay > 0 and wants_weight_decay(name, p) else 0.0
        key = (scale_fn(name), wd)
        g = groups.setdefault(key, {"params": [], "names": [], "lr_scale": key[0], "weight_decay": wd})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_optimizer(named_params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                    scale_fn: Callable[[str], float] = lr_scale) -> torch.optim.AdamW:
    groups = param_groups(named_params, weight_decay, scale_fn)
    if not groups:
        from rwkvkit.errors import ConfigError

        raise ConfigError("no trainable parameters (every parameter is frozen)")
    on_cuda = groups[0]["params"][0].is_cuda
    # AdamW with weight_decay 0 is exactly Adam, so one optimizer covers both of RWKV-LM's modes
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if on_cuda else None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
