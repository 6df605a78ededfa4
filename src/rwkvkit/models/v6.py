"""RWKV-6 "Finch" (x060): data-dependent token shift (ddlerp) and data-dependent decay, via small LoRAs.

Parameter names and shapes equal the official checkpoints; the recurrence is `rwkvkit.ops.wkv6`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rwkvkit.models.common import (RWKVConfig, RWKVModel, channel_ramp, group_norm, packed_cu_seqlens, token_shift,
                                   zigzag)
from rwkvkit.ops.wkv6 import wkv6

# = 1e-5 * head_size_divisor**2 with the official divisor 8 (x052 divides by 8 instead, same result).
_GROUP_NORM_EPS = 64e-5


def _vec(n: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(1, 1, n))


class TimeMix(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, A, H, N = config.n_embd, config.dim_att, config.n_head, config.head_size
        D, W = config.mix_lora, config.decay_lora
        self.n_head, self.head_size = H, N
        self.time_maa_x, self.time_maa_w, self.time_maa_k = _vec(C), _vec(C), _vec(C)
        self.time_maa_v, self.time_maa_r, self.time_maa_g = _vec(C), _vec(C), _vec(C)
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
        self.time_decay = _vec(A)
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, W))
        self.time_decay_w2 = nn.Parameter(torch.zeros(W, A))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=_GROUP_NORM_EPS)

    def forward(self, x, x_prev, state, v_first, packing=None):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, x_prev, packing) - x
        # ddlerp: one LoRA gives the five data-dependent shift amounts (for w, k, v, r, g)
        lora = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(lora, self.time_maa_w2).view(5, B, T, C).unbind(0)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)

        r = self.receptance(xr).view(B, T, H, N)
        k = self.key(xk).view(B, T, H, N)
        v = self.value(xv).view(B, T, H, N)
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        log_decay = -torch.exp(w.float()).view(B, T, H, N)  # fp32: decays can be within 1e-5 of 1
        y, state = wkv6(r, log_decay, k, v, self.time_faaaa, initial_state=state,
                        cu_seqlens=packed_cu_seqlens(packing))
        y = group_norm(y.reshape(B, T, H * N), self.ln_x)
        return self.output(y * g), state, v_first


class ChannelMix(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, F_ = config.n_embd, config.dim_ffn
        self.time_maa_k = _vec(C)
        self.time_maa_r = _vec(C)
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x, x_prev, packing=None):
        xx = token_shift(x, x_prev, packing) - x
        k = torch.relu(self.key(x + xx * self.time_maa_k)) ** 2
        return torch.sigmoid(self.receptance(x + xx * self.time_maa_r)) * self.value(k)


class RWKV6(RWKVModel):
    version = "6"
    time_mix = TimeMix
    channel_mix = ChannelMix

    @torch.no_grad()
    def init_weights(self) -> None:
        """RWKV-LM x060 init: mix/decay ramps, zero LoRA down-projections with U(-0.01, 0.01) up-projections,
        then generate_init_weight for the matrices."""
        cfg = self.config
        A, C, H, N = cfg.dim_att, cfg.n_embd, cfg.n_head, cfg.head_size
        n = torch.arange(A, dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            att, ffn = block.att, block.ffn
            ddd, r01, r1a0 = channel_ramp(cfg, i)
            ddd = ddd.view(1, 1, C)
            att.time_maa_x.copy_(1 - ddd.pow(r1a0))
            att.time_maa_w.copy_(1 - ddd.pow(r1a0))
            att.time_maa_k.copy_(1 - ddd.pow(r1a0))
            att.time_maa_v.copy_(1 - (ddd.pow(r1a0) + 0.3 * r01))
            att.time_maa_r.copy_(1 - ddd.pow(0.5 * r1a0))
            att.time_maa_g.copy_(1 - ddd.pow(0.5 * r1a0))
            att.time_maa_w1.zero_()
            nn.init.uniform_(att.time_maa_w2, -0.01, 0.01)
            att.time_decay.copy_((-6 + 5 * (n / (A - 1)).pow(0.7 + 1.3 * r01)).view(1, 1, A))
            att.time_decay_w1.zero_()
            nn.init.uniform_(att.time_decay_w2, -0.01, 0.01)
            att.time_faaaa.copy_((r01 * (1 - n / (A - 1)) + 0.1 * zigzag(A)).view(H, N))
            ffn.time_maa_k.copy_(1 - ddd.pow(r1a0**3))
            ffn.time_maa_r.copy_(1 - ddd.pow(r1a0**3))
        self._init_norms()
        self._init_matrices()
