"""RWKVModel.compile_blocks: what it hands torch.compile (the compiled graphs: tests/ops/test_wkv7_triton.py)."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import compiles_here

from rwkvkit.errors import ConfigError
from rwkvkit.models import RWKVConfig, build_model
from rwkvkit.train.loss import lm_loss


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


def test_a_memory_budget_outside_0_to_1_is_named(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    model = build_model(RWKVConfig("7", 1, 32, 50, head_size=16), init=True)
    with pytest.raises(ConfigError, match="between 0 and 1, got 1.5"):
        model.compile_blocks(memory_budget=1.5)


def _saved_bytes_loss_and_grads(model, idx):
    """What autograd keeps for the backward of the model's loss on idx (bytes), the loss, and the gradients."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model.hidden(idx)[0], model.head.weight, idx)
    loss.backward()
    return saved[0], loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@compiles_here
def test_a_memory_budget_recomputes_activations_inside_the_compiled_blocks():
    """Budget 0 keeps only what the compiled graphs take in; the gradients stay those of eager mode."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (compiles_here: torch 2.11's CPU code generator fails)
    torch.manual_seed(0)
    model = build_model(RWKVConfig("7", 2, 64, 97, head_size=16), init=True).to(device)
    idx = torch.randint(0, 97, (2, 33), device=device)
    _, loss_eager, grads_eager = _saved_bytes_loss_and_grads(model, idx)
    saved = {}
    for budget in (1.0, 0.0):
        torch._dynamo.reset()
        model.compile_blocks(memory_budget=budget)
        saved[budget], loss, grads = _saved_bytes_loss_and_grads(model, idx)
        assert abs(loss - loss_eager) < 1e-5
        for g, g0 in zip(grads, grads_eager):
            assert (g - g0).norm() <= 1e-4 * g0.norm() + 1e-7
        for block in model.blocks:  # back to the eager methods for the next budget
            del block.time_mix_residual, block.channel_mix_residual
    torch._dynamo.reset()
    assert saved[0.0] < 0.6 * saved[1.0], saved
