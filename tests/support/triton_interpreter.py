"""Kernel tests run the real Triton kernels on a GPU, and the same kernels in Triton's CPU interpreter without one.

The interpreter is chosen when each @triton.jit function is created, triton's own library included, so
TRITON_INTERPRET=1 must be set before triton is first imported: call `device_for_kernel_tests` at the top of a test
module, before importing triton or the kernel modules.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()


def device_for_kernel_tests(*kernel_modules: str) -> str:
    """"cuda", or "cpu" with the interpreter switched on; skips the calling module where that is impossible.

    kernel_modules: modules already imported by earlier tests (compiled, not interpreted) are reloaded.
    """
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    if ON_GPU:
        return "cuda"
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(standard.cdiv, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone",
                    allow_module_level=True)
    for name in kernel_modules:
        if name in sys.modules:
            importlib.reload(sys.modules[name])
    return "cpu"


def fill_new_buffers_with_nan(monkeypatch) -> None:
    """Until monkeypatch.undo(), torch.empty and torch.empty_like return NaN-filled tensors: every buffer a kernel
    fills starts as NaN, so an element it forgets to write shows up in what it returns."""
    for name in ("empty", "empty_like"):
        alloc = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _alloc=alloc, **kw: _alloc(*a, **kw).fill_(float("nan")))


def check_bf16_saved_states(monkeypatch, kernel_module, run_config, config, want, names) -> None:
    """WKV7 / WKV6 with 16-bit inputs: `run_config(cfg)` (outputs and gradients) with `config`, whose
    half_saved_states keeps the per-chunk states for the backward in bf16, and with float32 states instead, into
    NaN-filled buffers. Checks that the states kept were bf16, then float32, and that every result stays within
    1.35x the error of the float32 run against `want` (float64) and, at the GPU's head size, within the issue's
    1.2x of the bf16 floor (in the interpreter at N = 16, float32 states give about 2x)."""
    from rwkvkit.ops.testing import rel_rms

    kept = []
    forward = kernel_module._forward

    def spy(*args, **kw):
        out = forward(*args, **kw)
        kept.append(out[2].dtype)  # the per-chunk states
        return out

    monkeypatch.setattr(kernel_module, "_forward", spy)
    fill_new_buffers_with_nan(monkeypatch)
    half_err, full_err = ([rel_rms(g, w) for g, w in zip(run_config(cfg), want)]
                          for cfg in (config, config._replace(half_saved_states=False)))
    monkeypatch.undo()
    assert kept == [torch.bfloat16, torch.float32]
    for name, half, full, w in zip(names, half_err, full_err, want):
        floor = rel_rms(w.bfloat16(), w)
        assert half <= 1.35 * full and (half < 1.2 * floor or not ON_GPU), (name, half / floor, full / floor)


def count_chunks_on(where: str, cu_seqlens, monkeypatch):
    """cu_seqlens on the CPU ("host": the packed kernels' grids count the chunks exactly) or as on a GPU ("device":
    grids sized by a bound, with spare programs): there, or in the interpreter by making counting look costly.
    Map caching is reset until monkeypatch.undo()."""
    from collections import OrderedDict

    from rwkvkit.ops import varlen

    monkeypatch.setattr(varlen, "_MAPS", OrderedDict())
    if where == "host":
        return cu_seqlens.cpu()
    if ON_GPU:
        return cu_seqlens.cuda()
    monkeypatch.setattr(varlen, "counting_is_free", lambda cu: False)
    return cu_seqlens


def assert_kernel_matches(reference, kernel, case, names, monkeypatch, tol=2e-5) -> list:
    """kernel and reference on case = (inputs, initial state or None, dy, d final state): outputs, final state and
    every gradient (the kernel's into NaN-filled buffers) have the reference's dtype and shape, are finite and
    within tol in relative error. Returns the kernel's results."""
    from rwkvkit.ops.testing import run_with_grads

    want = run_with_grads(reference, *case)
    fill_new_buffers_with_nan(monkeypatch)
    got = run_with_grads(kernel, *case)
    monkeypatch.undo()
    assert len(got) == len(want)
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        err = ((g.double() - w.double()).norm() / w.double().norm()).item()
        assert err < tol, (name, err)
    return got
