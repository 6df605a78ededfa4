"""Tiny random checkpoints in the official BlinkDL layout, written from the shape tables (not from our model).

Shared by tests/models and tests/runtime (tests/support is on pytest's pythonpath, see pyproject.toml)."""

from __future__ import annotations

import math

import torch

# Tiny but not degenerate: 2 layers, 2-4 heads, a vocab that is not a power of two.
TINY = {
    "4": dict(n_layer=2, n_embd=64, vocab=97, dim_ffn=256),
    "5.2": dict(n_layer=2, n_embd=64, vocab=97, head_size=16, dim_ffn=224),
    "6": dict(n_layer=2, n_embd=64, vocab=97, head_size=16, dim_ffn=224, mix_lora=8, decay_lora=16),
    "7": dict(n_layer=2, n_embd=64, vocab=97, head_size=16, dim_ffn=256, w_lora=16, a_lora=16, v_lora=8, g_lora=32),
}


def official_state_dict(version: str, seed: int = 0, dtype=torch.float32, **overrides) -> dict[str, torch.Tensor]:
    """A random state dict with the official keys and shapes of `version`, with values in realistic ranges
    (decays well inside (0, 1), mixes in [0, 1], matrices ~ 1/sqrt(fan_in)) so that the logits are informative."""
    d = {**TINY[version], **overrides}
    g = torch.Generator().manual_seed(seed)
    L, C, V, F = d["n_layer"], d["n_embd"], d["vocab"], d["dim_ffn"]

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def unif(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def mat(out_dim, in_dim):
        return randn(out_dim, in_dim, scale=1 / math.sqrt(in_dim))

    def vec(lo=0.0, hi=1.0):
        return unif(lo, hi, 1, 1, C)

    sd = {"emb.weight": randn(V, C), "head.weight": mat(V, C)}
    sd["ln_out.weight"], sd["ln_out.bias"] = 1 + randn(C, scale=0.1), randn(C, scale=0.1)
    sd["blocks.0.ln0.weight"], sd["blocks.0.ln0.bias"] = 1 + randn(C, scale=0.1), randn(C, scale=0.1)
    for i in range(L):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + randn(C, scale=0.1), randn(C, scale=0.1)
        a, f = p + "att.", p + "ffn."
        if version == "4":
            sd[a + "time_decay"] = unif(-3, 2, C)
            sd[a + "time_first"] = unif(-1, 1, C)
            for n in ("k", "v", "r"):
                sd[a + f"time_mix_{n}"] = vec()
            for n in ("key", "value", "receptance"):
                sd[a + n + ".weight"] = mat(C, C)
            sd[a + "output.weight"] = mat(C, C)
        elif version in ("5.2", "6"):
            N = d["head_size"]
            H = C // N
            if version == "5.2":
                for n in ("k", "v", "r", "g"):
                    sd[a + f"time_mix_{n}"] = vec()
                sd[a + "time_decay"] = unif(-4, 1, H, N)
            else:
                D, W = d["mix_lora"], d["decay_lora"]
                for n in ("x", "w", "k", "v", "r", "g"):
                    sd[a + f"time_maa_{n}"] = vec()
                sd[a + "time_maa_w1"] = randn(C, 5 * D, scale=0.1)
                sd[a + "time_maa_w2"] = randn(5, D, C, scale=0.1)
                sd[a + "time_decay"] = unif(-4, 1, 1, 1, C)
                sd[a + "time_decay_w1"] = randn(C, W, scale=0.1)
                sd[a + "time_decay_w2"] = randn(W, C, scale=0.1)
            sd[a + "time_faaaa"] = unif(-0.5, 0.5, H, N)
            for n in ("receptance", "key", "value", "gate"):
                sd[a + n + ".weight"] = mat(C, C)
            sd[a + "output.weight"] = mat(C, C)
            sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = 1 + randn(C, scale=0.1), randn(C, scale=0.1)
        else:
            N = d["head_size"]
            for n in ("r", "w", "k", "v", "a", "g"):
                sd[a + f"x_{n}"] = vec()
            sd[a + "w0"] = vec(-3, 1)
            sd[a + "a0"] = vec(-1, 1)
            sd[a + "v0"] = vec(-1, 1)
            for n, D in (("w", d["w_lora"]), ("a", d["a_lora"]), ("v", d["v_lora"]), ("g", d["g_lora"])):
                sd[a + f"{n}1"] = randn(C, D, scale=0.3)
                sd[a + f"{n}2"] = randn(D, C, scale=0.3)
            sd[a + "k_k"] = vec(0.5, 1.0)
            sd[a + "k_a"] = vec(0.8, 1.2)
            sd[a + "r_k"] = randn(C // N, N, scale=0.3)
            for n in ("receptance", "key", "value", "output"):
                sd[a + n + ".weight"] = mat(C, C)
            sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = 1 + randn(C, scale=0.1), randn(C, scale=0.1)
        if version == "7":
            sd[f + "x_k"] = vec()
        elif version == "6":
            sd[f + "time_maa_k"], sd[f + "time_maa_r"] = vec(), vec()
        else:
            sd[f + "time_mix_k"], sd[f + "time_mix_r"] = vec(), vec()
        sd[f + "key.weight"] = mat(F, C)
        sd[f + "value.weight"] = mat(C, F)
        if version != "7":
            sd[f + "receptance.weight"] = mat(C, C)
    return {k: v.to(dtype) for k, v in sd.items()}
