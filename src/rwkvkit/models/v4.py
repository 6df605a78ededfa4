"""RWKV-4: per-channel WKV with a learned decay and a bonus for the current token (the "RWKV-4 Pile/Raven" models).

Parameter names and shapes equal the official checkpoints; the recurrence is `rwkvkit.ops.wkv4`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rwkvkit.models.common import RWKVConfig, RWKVModel, channel_ramp, packed_cu_seqlens, token_shift, zigzag
from rwkvkit.ops.wkv4 import wkv4


def lerp_mix(x: torch.Tensor, x_shift: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """The v4/v5 token shift: mix * x + (1 - mix) * previous x."""
    return x * mix + x_shift * (1 - mix)


class TimeMix(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, A = config.n_embd, config.dim_att
        self.time_decay = nn.Parameter(torch.zeros(A))
        self.time_first = nn.Parameter(torch.zeros(A))
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    def forward(self, x, x_prev, state, v_first, packing=None):
        xs = token_shift(x, x_prev, packing)
        k = self.key(lerp_mix(x, xs, self.time_mix_k))
        v = self.value(lerp_mix(x, xs, self.time_mix_v))
        r = torch.sigmoid(self.receptance(lerp_mix(x, xs, self.time_mix_r)))
        # decay and bonus in fp32: -exp(time_decay) is close to 0 for slow channels
        y, state = wkv4(-torch.exp(self.time_decay.float()), self.time_first.float(), k, v, initial_state=state,
                        cu_seqlens=packed_cu_seqlens(packing))
        return self.output(r * y), state, v_first


class ChannelMix(nn.Module):
    """The v4 / v5.2 channel-mix: sigmoid(Wr xr) * Wv relu(Wk xk)^2."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, F = config.n_embd, config.dim_ffn
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, F, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F, C, bias=False)

    def forward(self, x, x_prev, packing=None):
        xs = token_shift(x, x_prev, packing)
        k = torch.relu(self.key(lerp_mix(x, xs, self.time_mix_k))) ** 2
        return torch.sigmoid(self.receptance(lerp_mix(x, xs, self.time_mix_r))) * self.value(k)


class RWKV4(RWKVModel):
    version = "4"
    time_mix = TimeMix
    channel_mix = ChannelMix

    @torch.no_grad()
    def init_weights(self) -> None:
        """RWKV-v4neo init: per-channel decay/bonus/mix ramps; orthogonal matrices with gain sqrt(out/in) when
        out > in; att key/receptance/output and ffn receptance/value start at zero; emb ~ U(-1e-4, 1e-4)."""
        cfg = self.config
        A, C = cfg.dim_att, cfg.n_embd
        n = torch.arange(A, dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            att, ffn = block.att, block.ffn
            ddd, r01, r1a0 = channel_ramp(cfg, i)
            att.time_decay.copy_(-5 + 8 * (n / (A - 1)).pow(0.7 + 1.3 * r01))
            att.time_first.copy_(math.log(0.3) + 0.5 * zigzag(A))
            att.time_mix_k.copy_(ddd.pow(r1a0).view(1, 1, C))
            att.time_mix_v.copy_((ddd.pow(r1a0) + 0.3 * r01).view(1, 1, C))
            att.time_mix_r.copy_(ddd.pow(0.5 * r1a0).view(1, 1, C))
            ffn.time_mix_k.copy_(ddd.pow(r1a0).view(1, 1, C))
            ffn.time_mix_r.copy_(ddd.pow(r1a0).view(1, 1, C))
        self._init_norms()
        zero = (".att.key.", ".att.receptance.", ".att.output.", ".ffn.receptance.", ".ffn.value.")
        for name, p in self.named_parameters():
            full = "." + name
            if name == "emb.weight":
                nn.init.uniform_(p, -1e-4, 1e-4)
            elif p.dim() != 2 or "ln" in name or "time_" in name:
                continue
            elif any(s in full for s in zero):
                p.zero_()
            else:
                rows, cols = p.shape
                gain = (0.5 if name == "head.weight" else 1.0) * (math.sqrt(rows / cols) if rows > cols else 1.0)
                nn.init.orthogonal_(p, gain=gain)
