"""RWKVModel.compile_blocks: what it hands torch.compile (the compiled graphs: tests/ops/test_wkv7_triton.py)."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.models import RWKVConfig, build_model


@pytest.mark.parametrize("mode, expected", [("default", {}), ("reduce-overhead", {"mode": "reduce-overhead"})])
def test_compile_blocks_compiles_two_graphs_per_block_and_passes_the_mode(monkeypatch, mode, expected):
    """ln1 + time-mix + residual + ln2, and channel-mix + residual: the blocks then run the compiled functions."""
    seen, calls = [], []

    def fake_compile(fn, **options):
        seen.append((fn, options))

        def compiled(*args):
            calls.append(fn.__func__.__name__)
            return fn(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = build_model(RWKVConfig("7", 2, 32, 50, head_size=16), init=True)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    want = model(ids)[0]
    model.compile_blocks(mode)
    assert [options for _, options in seen] == [expected] * 4
    assert [fn.__func__.__name__ for fn, _ in seen] == ["time_mix_residual", "channel_mix_residual"] * 2
    assert torch.equal(model(ids)[0], want)
    assert calls == ["time_mix_residual", "channel_mix_residual"] * 2
