"""The WKV kernels compile for a Hopper GPU, checked without one (tests/support/compile_kernels.py says why)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "support" / "compile_kernels.py"


@pytest.mark.slow
def test_the_wkv7_and_wkv6_kernels_compile_for_sm90():
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    compiled = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("compiled ")}
    want = {f"rwkvkit.ops.wkv7.triton_chunk.{k}" for k in
            ("_fwd_prep", "_fwd_state", "_fwd_out", "_bwd_prep", "_bwd_state", "_bwd_chunk")}
    want |= {f"rwkvkit.ops.wkv6.triton_chunk.{k}" for k in ("_fwd_state", "_fwd_out", "_bwd_state", "_bwd_chunk")}
    assert compiled == want, sorted(compiled ^ want)
