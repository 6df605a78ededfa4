"""Helpers for the runtime tests: tiny official-layout checkpoints and the official package as an oracle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from official_checkpoints import official_state_dict  # noqa: F401  (re-exported for the runtime tests)

HERE = Path(__file__).resolve().parent


def run_official(workdir: Path, models: dict[str, Path], prompt: list[int], steps: list[int]) -> dict:
    """The official package's results for {version: checkpoint}: logits of the prompt (full_output) and of each
    one-token step, and the final flat state. v7 and v4-v6 run in two processes at once."""
    pytest.importorskip("rwkv")
    procs = {}
    for v7 in (False, True):
        chosen = {v: str(p.with_suffix("")) for v, p in models.items() if (v == "7") == v7}
        if not chosen:
            continue
        spec = workdir / f"official_spec_{v7}.json"
        spec.write_text(json.dumps({"v7": v7, "prompt": prompt, "steps": steps, "models": chosen}))
        out = workdir / f"official_out_{v7}.pt"
        cmd = [sys.executable, str(HERE / "official_runner.py"), str(spec), str(out)]
        procs[out] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = {}
    for out, proc in procs.items():
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
        results.update(torch.load(out))
    return results


def token_ids(batch: int, length: int, seed: int = 0):
    """[batch, length] random ids below 97 (inside every test model's vocabulary), reproducible by seed."""
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_v7(n_layer: int, seed: int = 0, **config):
    """A tiny RWKV-7 (default width 64, head 16, vocab 97; `config` overrides RWKVConfig fields) in eval mode, with
    noise on every weight: the init zeroes some matrices, and every path should count."""
    from rwkvkit.models import build_model
    from rwkvkit.models.common import RWKVConfig

    torch.manual_seed(seed)
    config = dict(n_embd=64, vocab_size=97, head_size=16) | config
    model = build_model(RWKVConfig("7", n_layer=n_layer, **config), init=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model
