"""RWKVModel.compile_blocks: what it hands torch.compile (the compiled graphs: tests/ops/test_wkv7_triton.py)."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.models import RWKVConfig, build_model


@pytest.mark.parametrize("mode, expected", [("default", {}), ("reduce-overhead", {"mode": "reduce-overhead"})])
def test_compile_blocks_compiles_ln1_with_the_time_mix_and_passes_the_mode(monkeypatch, mode, expected):
    seen = []

    def fake_compile(fn, **options):
        seen.append((fn, options))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = build_model(RWKVConfig("7", 2, 32, 50, head_size=16), init=True)
    compiled = {}
    for block in model.blocks:  # nn.Module.compile also goes through torch.compile
        monkeypatch.setattr(block.ffn, "compile", lambda block=block, **o: compiled.setdefault(block, o))
    model.compile_blocks(mode)
    assert [options for _, options in seen] == [expected] * 2
    assert [fn.__func__.__name__ for fn, _ in seen] == ["time_mix_residual"] * 2
    assert list(compiled.values()) == [expected] * 2
