"""`rwkvkit estimate`: the compute, time and memory a training run needs, before renting the GPUs.

FLOPs = 6 x parameters x tokens (forward 2, backward 4 per parameter and token; the WKV recurrence adds a few %).
GPU-hours = FLOPs / (peak FLOP/s x MFU). The seeds' worked example: 14B x 300B x 6 = 2.5e22 FLOPs, which at
an A100's 312 TFLOP/s bf16 peak is about 22,400 GPU-hours.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from rwkvkit.errors import ConfigError

PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0, "b200": 2250.0, "4090": 165.0, "a6000": 155.0}

# official size ladder (RWKV-LM README) plus the RWKV-4 14B: name -> (n_layer, n_embd)
SHAPES = {"0.1B": (12, 768), "0.4B": (24, 1024), "1.5B": (24, 2048), "3B": (32, 2560), "7B": (32, 4096),
          "14B": (40, 5120)}

# Bytes kept for backward per token, per layer, in units of n_embd, for the plain-PyTorch v7 block under bf16
# autocast: ~30 C-sized tensors (token-shift mixes, r/w/k/v/a/g, kk, WKV output, norms, the 4C channel-mix
# hidden before and after relu^2) at 2 bytes, plus ~20C bytes of fp32 WKV state checkpoints (every 16 tokens).
ACT_BYTES_PER_C = 80
# with per-block checkpointing only each block's fp32 input stays (4 bytes x C), plus one block being recomputed
ACT_BYTES_PER_C_CP = 4


def parse_count(text: str) -> float:
    """'14B' -> 1.4e10, '300B' -> 3e11, '1.5e9' -> 1.5e9, '500M', '20k'."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise ConfigError(f"cannot read {text!r} as a count (examples: 14B, 300B, 1.5e9, 500M)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return float(m.group(1)) * scale


@dataclass
class Estimate:
    params: float
    tokens: float
    flops: float
    gpu_hours: float
    train_state_gb: float  # fp32 weights + fp32 grads + Adam moments
    weights_bf16_gb: float
    act_gb_per_1k_tokens: float | None = None
    act_gb_per_1k_tokens_cp: float | None = None


def estimate(params: float, tokens: float, peak_tflops: float = PEAK_TFLOPS["a100"], mfu: float = 1.0,
             n_layer: int | None = None, n_embd: int | None = None, vocab_size: int = 65536) -> Estimate:
    flops = 6.0 * params * tokens
    hours = flops / (peak_tflops * 1e12 * mfu) / 3600
    est = Estimate(params, tokens, flops, hours, params * 16 / 1e9, params * 2 / 1e9)
    if n_layer and n_embd:
        logits = vocab_size * 4  # fp32 logits per token, unless the chunked head bounds them
        est.act_gb_per_1k_tokens = 1000 * (n_layer * n_embd * ACT_BYTES_PER_C + logits) / 1e9
        est.act_gb_per_1k_tokens_cp = 1000 * (n_layer * n_embd * ACT_BYTES_PER_C_CP + n_embd * ACT_BYTES_PER_C
                                              + logits) / 1e9
    return est


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def format_estimate(e: Estimate, gpu: str, mfu: float) -> str:
    lines = [
        f"parameters        {e.params:.3g}",
        f"tokens            {e.tokens:.3g}",
        f"training FLOPs    {e.flops:.3g}  (6 x params x tokens)",
        f"GPU-hours         {_hours(e.gpu_hours)}  ({gpu.upper()} at {PEAK_TFLOPS[gpu]:g} TFLOP/s x MFU {mfu:g})",
        f"  on 8 GPUs       {_hours(e.gpu_hours / 8)} wall-clock hours ({e.gpu_hours / 8 / 24:,.1f} days)",
        f"weights (bf16)    {e.weights_bf16_gb:,.1f} GB",
        f"training state    {e.train_state_gb:,.1f} GB  (fp32 weights + grads + AdamW moments, 16 B/param;"
        f" shard it with FSDP across GPUs)",
    ]
    if e.act_gb_per_1k_tokens is not None:
        lines.append(f"activations       {e.act_gb_per_1k_tokens:,.2f} GB per 1k tokens in flight"
                     f" ({e.act_gb_per_1k_tokens_cp:,.2f} GB with --train.grad_cp; logits not chunked)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI

    def run(model: str, tokens: str, gpu: str = "a100", mfu: float = 1.0, n_layer: int | None = None,
            n_embd: int | None = None, vocab_size: int = 65536) -> None:
        """Estimate training FLOPs, GPU-hours and memory.

        Args:
            model: parameter count (14B, 0.4B, 1.5e9); the official sizes 0.1B 0.4B 1.5B 3B 7B 14B also give
                the layer shape used for the activation estimate.
            tokens: training tokens (300B, 1.5e9).
            gpu: a100, h100, h200, b200, 4090 or a6000 (bf16 dense peak).
            mfu: the fraction of peak actually reached (1.0 = peak, as the seeds' worked example assumes;
                0.3-0.5 is typical).
            n_layer: layers, for the activation estimate of a non-ladder size.
            n_embd: width, for the activation estimate of a non-ladder size.
            vocab_size: vocabulary (logits memory).
        """
        if gpu not in PEAK_TFLOPS:
            raise ConfigError(f"unknown --gpu {gpu!r}; choose one of {', '.join(PEAK_TFLOPS)}")
        if not 0 < mfu <= 1:
            raise ConfigError("--mfu must be in (0, 1]")
        L, D = SHAPES.get(model.strip().upper(), (n_layer, n_embd))
        e = estimate(parse_count(model), parse_count(tokens), PEAK_TFLOPS[gpu], mfu, L or n_layer,
                     D or n_embd, vocab_size)
        print(format_estimate(e, gpu, mfu))

    CLI(run, args=sys.argv[1:] if argv is None else argv, as_positional=False, prog="rwkvkit estimate")
    return 0
