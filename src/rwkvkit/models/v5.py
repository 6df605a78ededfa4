"""RWKV-5.2 "Eagle" (x052): multi-head matrix-valued state with a per-channel (time-constant) decay and a gate.

Parameter names and shapes equal the official checkpoints; the recurrence is `rwkvkit.ops.wkv6` with a decay that
does not depend on the token. RWKV-5.0/5.1 (pre-release layouts) are not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rwkvkit.models.common import (RWKVConfig, RWKVModel, channel_ramp, group_norm, packed_cu_seqlens, token_shift,
                                   zigzag)
from rwkvkit.models.v4 import ChannelMix, lerp_mix
from rwkvkit.ops.wkv6 import wkv6

# The official x052 divides the WKV output by 8 before a GroupNorm with the default eps 1e-5.
HEAD_SIZE_DIVISOR = 8


class TimeMix(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, A, H, N = config.n_embd, config.dim_att, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_g = nn.Parameter(torch.zeros(1, 1, C))
        self.time_decay = nn.Parameter(torch.zeros(H, N))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(H, A)

    def forward(self, x, x_prev, state, v_first, packing=None):
        B, T, _ = x.shape
        H, N = self.n_head, self.head_size
        xs = token_shift(x, x_prev, packing)
        r = self.receptance(lerp_mix(x, xs, self.time_mix_r)).view(B, T, H, N)
        k = self.key(lerp_mix(x, xs, self.time_mix_k)).view(B, T, H, N)
        v = self.value(lerp_mix(x, xs, self.time_mix_v)).view(B, T, H, N)
        g = F.silu(self.gate(lerp_mix(x, xs, self.time_mix_g)))
        log_decay = -torch.exp(self.time_decay.float())  # [H, N], every token's; fp32: decays can be within 1e-5 of 1
        y, state = wkv6(r, log_decay, k, v, self.time_faaaa, initial_state=state,
                        cu_seqlens=packed_cu_seqlens(packing))
        y = group_norm(y.reshape(B, T, H * N) / HEAD_SIZE_DIVISOR, self.ln_x)
        return self.output(y * g), state, v_first


class RWKV5(RWKVModel):
    version = "5.2"
    time_mix = TimeMix
    channel_mix = ChannelMix

    @torch.no_grad()
    def init_weights(self) -> None:
        """RWKV-LM x052 init: per-channel decay/bonus/mix ramps, then generate_init_weight for the matrices."""
        cfg = self.config
        A, C, H, N = cfg.dim_att, cfg.n_embd, cfg.n_head, cfg.head_size
        n = torch.arange(A, dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            att, ffn = block.att, block.ffn
            ddd, r01, r1a0 = channel_ramp(cfg, i)
            att.time_mix_k.copy_(ddd.pow(r1a0).view(1, 1, C))
            att.time_mix_v.copy_((ddd.pow(r1a0) + 0.3 * r01).view(1, 1, C))
            att.time_mix_r.copy_(ddd.pow(0.5 * r1a0).view(1, 1, C))
            att.time_mix_g.copy_(ddd.pow(0.5 * r1a0).view(1, 1, C))
            att.time_decay.copy_((-6 + 5 * (n / (A - 1)).pow(0.7 + 1.3 * r01)).view(H, N))
            att.time_faaaa.copy_((r01 * (1 - n / (A - 1)) + 0.1 * zigzag(A)).view(H, N))
            ffn.time_mix_k.copy_(ddd.pow(r1a0).view(1, 1, C))
            ffn.time_mix_r.copy_(ddd.pow(r1a0).view(1, 1, C))
        self._init_norms()
        self._init_matrices()
