"""Weight-only int8 for inference: every matrix of the blocks and the head stored as int8 with one scale per
output row (symmetric, round to nearest), multiplied in the activations' dtype.

One-token decoding reads every weight once per token, so its speed is the weight bytes over the memory bandwidth:
int8 halves the bytes of fp16. That pays only where the dequantization is fused into the product: on the CPU with
bf16 activations (PyTorch's `_weight_int8pack_mm`, for up to 16 rows at a time) and in the `Decoder`'s fused
RWKV-7 step on CUDA (its kernels read the int8 bytes: 1.19x fp16 at 1.5B on an H100). Elsewhere it saves memory,
not time: the compiled layer step and the compat layer's `"cuda fp16i8"` (eager steps) widen the weights first
and measured slower with int8 than with fp16 (docs/generate.md). The LoRA matrices, mixes and norms stay as they are (a
few percent of the bytes).

    model = rwkvkit.load(path, device="cuda", dtype="fp16")
    quantize_int8(model)                       # in place; strategy "cuda fp16i8" does the same in rwkvkit.compat
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


_HAS_PACKED = hasattr(torch, "_weight_int8pack_mm")
_PACKED_MAX_ROWS = 16


class Int8Linear(nn.Module):
    """`nn.Linear` (no bias) with an int8 weight [out, in] and a per-output-row scale in the original dtype.

    Both are frozen Parameters, not buffers, so `named_parameters()` (which the Decoder hands to its compiled
    layer step) carries them.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free linears (RWKV has no biases)")
        w = linear.weight.detach().float()
        # the scale as it will be stored (in the model's dtype), so the rounding uses exactly that value
        scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127.0).to(linear.weight.dtype)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= _PACKED_MAX_ROWS and x.dtype == torch.bfloat16 and x.device.type == "cpu" and _HAS_PACKED:
            # PyTorch's fused int8-weight product on the CPU: it reads the int8 bytes directly (measured 2.8x a
            # bf16 GEMV at [768, 3072], 8.7x fp32 for the head); for many rows widening first is faster
            y = torch._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), self.weight, self.scale.to(x.dtype))
            return y.view(*x.shape[:-1], self.out_features)
        # scaled before the product: int8 units times activations would overflow fp16 (outputs ~127/max|row| too big)
        return F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of the model (blocks and head) by an `Int8Linear`, in place; returns the model.

    For inference only: the quantized model cannot be trained or saved as an official checkpoint.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model
