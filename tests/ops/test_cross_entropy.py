"""The fused cross-entropy + L2Wrap kernel against its PyTorch reference (interpreter on CPU, real on GPU)."""

from __future__ import annotations


import pytest
import torch
from triton_interpreter import device_for_kernel_tests

DEVICE = device_for_kernel_tests("rwkvkit.ops.cross_entropy.triton_fused")

from rwkvkit.ops.cross_entropy import ce_grad_, ce_grad_naive  # noqa: E402
from rwkvkit.ops.cross_entropy.triton_fused import ce_grad_triton  # noqa: E402
from rwkvkit.ops.testing import rel_rms  # noqa: E402
from rwkvkit.train.loss import L2WRAP_FACTOR  # noqa: E402



def chunk(n, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * 3).to(DEVICE, dtype)
    targets = torch.randint(0, V, (n,), generator=g).to(DEVICE)
    tw = torch.rand(n, generator=g).to(DEVICE)
    return logits, targets, tw


@pytest.mark.parametrize("n, V, block, dtype", [(7, 1000, 256, torch.float32), (5, 333, 128, torch.bfloat16),
                                                (3, 64, 64, torch.float16), (1, 1000, 1024, torch.float32)])
def test_kernel_matches_reference(n, V, block, dtype):
    logits, targets, tw = chunk(n, V, dtype, seed=n * V)
    want_grad = logits.clone()
    want_loss = ce_grad_naive(want_grad, targets, tw, L2WRAP_FACTOR)
    got_grad = torch.full_like(logits, float("nan"))  # every element must be written
    got_grad.copy_(logits)
    got_loss = ce_grad_triton(got_grad, targets, tw, L2WRAP_FACTOR, block=block)
    assert torch.isfinite(got_grad).all()
    assert abs(got_loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    # 16-bit gradients: within one rounding step (Triton's CPU interpreter truncates on the 16-bit store)
    assert rel_rms(got_grad, want_grad) < (1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps)


def test_reference_is_the_gradient_of_cross_entropy_plus_l2wrap():
    logits, targets, tw = chunk(4, 50, torch.float32, seed=1)
    x = logits.double().requires_grad_()
    ce = torch.nn.functional.cross_entropy(x, targets, reduction="none")
    aux = L2WRAP_FACTOR * x.max(-1).values ** 2 / 2
    ((ce + aux) * tw.double()).sum().backward()
    grad = logits.clone()
    loss = ce_grad_naive(grad, targets, tw, L2WRAP_FACTOR)
    assert rel_rms(grad, x.grad) < 1e-6
    assert abs(loss.item() - (ce * tw.double()).sum().item()) < 1e-5


def test_dispatch_uses_the_reference_on_cpu_tensors():
    logits, targets, tw = chunk(3, 40, torch.float32, seed=2)
    a, b = logits.clone(), logits.cpu().clone()
    ce_grad_(a, targets, tw, L2WRAP_FACTOR)
    ce_grad_(b, targets.cpu(), tw.cpu(), L2WRAP_FACTOR, impl="naive")
    assert torch.allclose(a.cpu(), b)
    with pytest.raises(ValueError, match="impl"):
        ce_grad_(a, targets, tw, L2WRAP_FACTOR, impl="fast")


def test_dispatcher_finds_the_kernel():
    """What `impl="auto"` runs on CUDA: the lookup must give the kernel function itself."""
    from rwkvkit.ops import triton_kernel
    from rwkvkit.ops.cross_entropy import _KERNEL

    assert triton_kernel("cross_entropy", *_KERNEL).__name__ == "ce_grad_triton"
