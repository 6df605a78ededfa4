"""Compile the WKV Triton kernels for a Hopper GPU (sm_90a) without one: `python tests/support/compile_kernels.py`.

The CPU interpreter runs a kernel's Python, not Triton's compiler, so code that the compiler rejects (a constexpr
assigned twice in an unrolled loop, a type that differs between branches) can pass every interpreter test and fail
on the first GPU run. Here the host code of each op runs on CPU tensors with every kernel launch recorded instead
of run (the outputs are left unwritten), and each recorded launch is then compiled to a cubin, ptxas included.
Prints one line per distinct kernel variant; exits non-zero on the first that does not compile.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be created as compiled (JIT) functions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rwkvkit.ops.testing import PACKED_LENGTHS, V7_MIN_LOG_DECAY  # noqa: E402
from rwkvkit.ops.varlen import cu_seqlens_of  # noqa: E402
from rwkvkit.ops.wkv6 import triton_chunk as wkv6_module  # noqa: E402
from rwkvkit.ops.wkv7 import triton_chunk as wkv7_module  # noqa: E402

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int8: "*i8",
                 torch.int32: "*i32", torch.int64: "*i64"}


def record_launches(launches: list) -> None:
    """From now on `kernel[grid](*args, **kw)` of any @triton.jit kernel records the launch instead of running it."""
    def launcher(kernel, grid):
        return lambda *args, **kw: launches.append((kernel, args, kw))

    triton.runtime.JITFunction.__getitem__ = launcher


def source(kernel, args, kw) -> tuple[ASTSource, dict]:
    """The launch as Triton's compiler takes it, and its options."""
    values = dict(zip([p.name for p in kernel.params], args))
    values |= {k: v for k, v in kw.items() if not k.startswith("num_")}
    signature, constexprs = {}, {}
    for p in kernel.params:
        value = values[p.name]
        if p.is_constexpr or value is None:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[p.name] = "fp32"
    options = {k: v for k, v in kw.items() if k in ("num_warps", "num_stages") and v is not None}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs), options


def run_ops() -> list:
    """The launches of each op's default path: WKV7 and WKV6, bf16 and float32, plain rows and packed sequences,
    forward and backward (with and without a final-state gradient); WKV6 with RWKV-5's time-constant decay."""
    launches: list = []
    record_launches(launches)
    os.environ["TRITON_INTERPRET"] = "1"  # (from here only the host code's device check reads it)
    g = torch.Generator().manual_seed(0)
    B, T, H, N = 1, sum(PACKED_LENGTHS), 2, 64
    cu = cu_seqlens_of(PACKED_LENGTHS)
    for dtype in (torch.bfloat16, torch.float32):
        x = [torch.randn(B, T, H, N, generator=g).to(dtype).requires_grad_() for _ in range(6)]
        for packed in (None, cu):
            n = len(PACKED_LENGTHS) if packed is not None else B
            s0 = torch.randn(n, H, N, N, generator=g).requires_grad_()
            y, s = wkv7_module.wkv7_triton(*x, s0, log_decay_min=V7_MIN_LOG_DECAY, cu_seqlens=packed)
            torch.autograd.backward([y], [torch.ones_like(y)])
            y, s = wkv7_module.wkv7_triton(*x, s0, log_decay_min=V7_MIN_LOG_DECAY, cu_seqlens=packed)
            torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])
            u = torch.randn(H, N, generator=g).requires_grad_()
            y, s = wkv6_module.wkv6_triton(*x[:4], u, s0, cu_seqlens=packed)
            torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])
        # RWKV-5: a time-constant float32 decay [H, N] (bf16 rows only, to keep the test's time down)
        if dtype == torch.bfloat16:
            w5 = (-torch.rand(H, N, generator=g)).requires_grad_()
            y, s = wkv6_module.wkv6_triton(x[0], w5, x[2], x[3], u, s0[:B])
            torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])
    return launches


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    seen = set()
    for kernel, args, kw in run_ops():
        src, options = source(kernel, args, kw)
        key = (kernel.fn.__name__, tuple(sorted(src.signature.items())), tuple(sorted(map(str, src.constants.items()))),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        triton.compile(src, target=target, options=options)
        print(f"compiled {kernel.fn.__module__}.{kernel.fn.__name__} {options}", flush=True)
    return 0 if seen else 1


if __name__ == "__main__":
    sys.exit(main())
