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


def record_saved_state_dtypes(kernel_module, monkeypatch) -> list:
    """The dtype of the per-chunk states each call's `_forward` keeps for the backward (its third output)."""
    seen = []
    forward = kernel_module._forward

    def spy(*args, **kw):
        out = forward(*args, **kw)
        seen.append(out[2].dtype)
        return out

    monkeypatch.setattr(kernel_module, "_forward", spy)
    return seen
