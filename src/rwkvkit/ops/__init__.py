"""The WKV recurrences of RWKV v4, v5/v6 and v7 (layouts and signatures: docs/design.md).

    from rwkvkit.ops.wkv4 import wkv4
    from rwkvkit.ops.wkv6 import wkv6   # also RWKV-5, with a time-constant decay
    from rwkvkit.ops.wkv7 import wkv7

Each subpackage holds naive.py (the per-step ground truth), chunked.py (fast pure PyTorch, and the T == 1 step)
and the GPU kernels (Triton); its `__init__` dispatches on `impl`. The functions are deliberately not
re-exported here: a function named like its subpackage would shadow it (`import rwkvkit.ops.wkv7 as m` would
then give the function).
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import warnings


_FOUND: dict[tuple, object] = {}

# "auto" sends sequences shorter than this to the PyTorch paths even on CUDA: a short prompt runs there in a few
# milliseconds, while a fresh machine's first Triton call compiles its kernels for seconds (first-token latency).
KERNEL_MIN_T = 128


def wants_kernel(x) -> bool:
    """Whether "auto" dispatch sends a [B, T, ...] input to a GPU kernel: on CUDA, from KERNEL_MIN_T tokens on."""
    return x.is_cuda and x.shape[1] >= KERNEL_MIN_T


def triton_kernel(op: str, module: str = "triton_chunk", name: str | None = None):
    """`rwkvkit.ops.<op>.<module>.<name>` (default `<op>_triton`), or None where it (or triton) is not installed.

    Looked up once: the dispatchers ask on every call, and a failed import would otherwise search sys.path again
    for each layer of each step. A plain dict rather than functools.cache, so that torch.compile reads the found
    kernel instead of breaking its graph on the import machinery.
    """
    key = (op, module, name)
    if key not in _FOUND:
        _FOUND[key] = _import_kernel(op, module, name)
    return _FOUND[key]


def _import_kernel(op: str, module: str, name: str | None):
    try:
        found = importlib.import_module(f"rwkvkit.ops.{op}.{module}")
    except ImportError:  # no triton here: the PyTorch paths serve
        return None
    except Exception as e:  # triton or torch too old or too new for the module: say so once, then fall back
        warnings.warn(f"rwkvkit.ops.{op}.{module} could not be loaded ({type(e).__name__}: {e}); "
                      "using the PyTorch implementation", RuntimeWarning, stacklevel=3)
        return None
    return getattr(found, name or f"{op}_triton")


# every kernel the dispatchers look up, as they ask for it (op, module, name): `preload_kernels` resolves them all
KERNELS = (("wkv4", "triton_chunk", None), ("wkv6", "triton_chunk", None), ("wkv7", "triton_chunk", None),
           ("cross_entropy", "triton_fused", "ce_grad_triton"))


def preload_kernels() -> None:
    """Look every kernel up now. Call before torch.compile traces a model: a first lookup inside traced code
    imports a module, and dynamo breaks the graph there for good (that frame is cached with the break)."""
    for key in KERNELS:
        triton_kernel(*key)


def require_triton_kernel(op: str, module: str = "triton_chunk", name: str | None = None):
    """The kernel for an explicit impl="triton", or a clear error naming the fallback."""
    kernel = triton_kernel(op, module, name)
    if kernel is None:
        from rwkvkit.errors import ConfigError

        raise ConfigError(f"{op} impl 'triton' needs triton and rwkvkit.ops.{op}.{module}; use the PyTorch impl")
    return kernel


# From this many sequences x heads on, a walk whose per-chunk loads do not depend on its value rows (WKV6's walks,
# WKV7's backward walk) takes all of a head's rows in one program, since a narrower one loads them again (H100,
# measured at 96 and 128: docs/gpu.md)
WHOLE_HEAD_WALKS = 96


def walk_block_v(batch_heads: int, V: int, requested: int | None) -> int:
    """Value rows per program of a sequential chunk walk (WKV6/WKV7): 32, or 16 when (batch x heads) is too small
    to fill the GPU with 32-row programs (batch-1 prefill), since each program walks all T tokens alone."""
    if requested is None:
        requested = 32 if batch_heads * V // 32 >= 128 else 16
    return min(requested, V)


_SYNCS = threading.local()


@contextlib.contextmanager
def without_device_syncs():
    """Inside, no op makes a choice that waits for the GPU (WKV7's decay check when no bound is given). For
    what a CUDA graph records, and for the warm-up runs before recording, which must take the same kernels."""
    before = getattr(_SYNCS, "off", False)
    _SYNCS.off = True
    try:
        yield
    finally:
        _SYNCS.off = before


def device_sync_allowed(x) -> bool:
    """Whether an op may wait for the GPU on x's behalf: not while a CUDA graph records, not in without_device_syncs."""
    import torch

    return not getattr(_SYNCS, "off", False) and not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def check_triton_device(x, kernel: str, fallback: str) -> None:
    """Triton kernels take GPU tensors; on the CPU only its interpreter (TRITON_INTERPRET=1, for tests) runs them."""
    import os

    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        from rwkvkit.errors import ConfigError

        raise ConfigError(f"triton {kernel}: CUDA tensors needed; use impl={fallback!r} on the CPU")
