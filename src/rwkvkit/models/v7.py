"""RWKV-7 "Goose" (x070): generalised delta-rule state, value residual, data-dependent decay and in-context rate.

Parameter names and shapes equal the official checkpoints (`blocks.{i}.att.x_r` ..., see
docs/models.md); the WKV recurrence itself is `rwkvkit.ops.wkv7`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rwkvkit.models.common import (RWKVConfig, RWKVModel, channel_ramp, group_norm, in_autocast_dtype,
                                   packed_cu_seqlens, token_shift)
from rwkvkit.ops.wkv7 import wkv7

# decay = exp(-e^{-0.5} * sigmoid(w_raw)) lies in (0.545, 1): the log-decay handed to the op is -e^{-0.5}*sigmoid.
_LOG_DECAY_SCALE = math.exp(-0.5)
# = 1e-5 * head_size_divisor**2 with the official divisor 8, whatever the head size.
_GROUP_NORM_EPS = 64e-5


def _vec(n: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(1, 1, n))


class TimeMix(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.layer_id = layer_id
        # a bool, not the index, in forward: torch.compile then makes one graph for layer 0 and one for the rest
        self.defines_v_first = layer_id == 0
        self.n_head, self.head_size = H, N
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (_vec(C) for _ in range(6))
        self.w0 = _vec(C)
        self.w1 = nn.Parameter(torch.zeros(C, config.w_lora))
        self.w2 = nn.Parameter(torch.zeros(config.w_lora, C))
        self.a0 = _vec(C)
        self.a1 = nn.Parameter(torch.zeros(C, config.a_lora))
        self.a2 = nn.Parameter(torch.zeros(config.a_lora, C))
        # Layer 0 owns v0/v1/v2 too (the official checkpoints have them) but never uses them: it defines v_first.
        self.v0 = _vec(C)
        self.v1 = nn.Parameter(torch.zeros(C, config.v_lora))
        self.v2 = nn.Parameter(torch.zeros(config.v_lora, C))
        self.g1 = nn.Parameter(torch.zeros(C, config.g_lora))
        self.g2 = nn.Parameter(torch.zeros(config.g_lora, C))
        self.k_k = _vec(C)
        self.k_a = _vec(C)
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=_GROUP_NORM_EPS)

    def forward(self, x, x_prev, state, v_first, packing=None):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, x_prev, packing) - x
        # x + xx * mix, one fused op each (this runs per token in decoding)
        xr, xw, xk, xv, xa, xg = (
            torch.addcmul(x, xx, mix) for mix in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        )

        r = self.receptance(xr)
        w_raw = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        log_decay = -_LOG_DECAY_SCALE * torch.sigmoid(w_raw.float())  # fp32: the decay can be within 1e-4 of 1
        k = self.key(xk)
        v = self.value(xv)
        if self.defines_v_first:
            # a copy, not an alias of v: torch.compile's autograd mishandles an output that aliases a tensor
            # viewed again inside the graph (seen under bf16 autocast); [B, T, C] once per step is cheap
            v_first = v.clone()
        else:  # value residual: mix in layer 0's value, per channel and token
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        r, k, v, a = (t.view(B, T, H, N) for t in (r, k, v, a))
        # the WKV kernels read their inputs several times; the official trainer's kernels take them in bf16 too
        k, v, a, b, log_decay = (in_autocast_dtype(t) for t in (k, v, -kk, kk * a, log_decay.view(B, T, H, N)))
        y, state = wkv7(r, log_decay, k, v, a, b, initial_state=state, log_decay_min=-_LOG_DECAY_SCALE,
                        cu_seqlens=packed_cu_seqlens(packing))

        y = group_norm(y.reshape(B, T, C), self.ln_x)
        # r_k bonus: the current token's own value, weighted per head by <r, k * r_k>
        y = y + ((r * k * self.r_k).sum(dim=-1, keepdim=True) * v).view(B, T, C)
        return self.output(y * g), state, v_first


class ChannelMix(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C = config.n_embd
        self.x_k = _vec(C)
        self.key = nn.Linear(C, config.dim_ffn, bias=False)
        self.value = nn.Linear(config.dim_ffn, C, bias=False)

    def forward(self, x, x_prev, packing=None):
        k = torch.addcmul(x, token_shift(x, x_prev, packing) - x, self.x_k)
        return self.value(torch.relu(self.key(k)) ** 2)


class RWKV7(RWKVModel):
    version = "7"
    time_mix = TimeMix
    channel_mix = ChannelMix

    @torch.no_grad()
    def init_weights(self) -> None:
        """RWKV-v7 train_temp init: per-channel ramps for the mixes/decay, zero LoRA down-projections with small
        orthogonal up-projections, then generate_init_weight's rules for emb, head and the big matrices."""
        cfg = self.config
        C, N = cfg.n_embd, cfg.head_size
        n = torch.arange(C, dtype=torch.float32)
        lin = n / (C - 1) - 0.5
        zz = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zz = zz * zz.abs()
        for i, block in enumerate(self.blocks):
            att, ffn = block.att, block.ffn
            ddd, r01, r1a0 = channel_ramp(cfg, i)
            mixes = ((att.x_r, 0.2), (att.x_w, 0.9), (att.x_k, 0.7), (att.x_v, 0.7), (att.x_a, 0.9), (att.x_g, 0.2))
            for p, power in mixes:
                p.copy_((1 - ddd.pow(power * r1a0)).view(1, 1, C))
            ffn.x_k.copy_((1 - ddd.pow(r1a0**4)).view(1, 1, C))
            www = -6 + 6 * (n / (C - 1)).pow(1 + r01**0.3)
            att.w0.copy_((www + 0.5 + 2.5 * zz).view(1, 1, C))  # +0.5: the old softplus form's offset
            att.a0.copy_((-0.19 + 0.3 * zz + 0.4 * lin).view(1, 1, C))
            att.v0.copy_((0.73 - 0.4 * lin).view(1, 1, C))
            att.k_k.copy_((0.71 - 0.1 * lin).view(1, 1, C))
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            for down, up in ((att.w1, att.w2), (att.a1, att.a2), (att.v1, att.v2), (att.g1, att.g2)):
                down.zero_()
                rows, cols = up.shape
                nn.init.orthogonal_(up, gain=0.1 * (math.sqrt(rows / cols) if rows > cols else 1.0))
        self._init_norms()
        self._init_matrices()
