"""The models on CUDA (the GPU WKV kernels where installed): same results as on CPU, GPT mode == RNN mode."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.models.checkpoint import load_checkpoint
from rwkvkit.ops.testing import rel_rms

pytestmark = pytest.mark.gpu

VERSIONS = ["4", "5.2", "6", "7"]


def _tokens(batch, length, seed=0):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_cuda_fp32_matches_cpu(make_checkpoint, version):
    path = make_checkpoint(version, head_size=64) if version != "4" else make_checkpoint(version)
    idx = _tokens(2, 100)
    ref, ref_state = load_checkpoint(path).eval()(idx)
    out, state = load_checkpoint(path, device="cuda").eval()(idx.cuda())
    # the Triton WKV kernels multiply tf32-rounded operands on the tensor cores (docs/gpu.md): ~1e-3 relative
    assert rel_rms(out.cpu(), ref) < 3e-3
    assert rel_rms(state.wkv.cpu(), ref_state.wkv) < 3e-3


@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_cuda_bf16_gpt_mode_equals_rnn_mode(make_checkpoint, version):
    path = make_checkpoint(version, head_size=64) if version != "4" else make_checkpoint(version)
    model = load_checkpoint(path, device="cuda", dtype=torch.bfloat16).eval()
    idx = _tokens(1, 40, seed=1).cuda()
    logits, state = model(idx)
    assert state.wkv.dtype == torch.float32
    rnn_state, steps = None, []
    for t in range(idx.shape[1]):
        step, rnn_state = model(idx[:, t : t + 1], rnn_state)
        steps.append(step[:, 0])
    # bf16 activations: the two orders of computation round differently, but must not drift apart
    assert (torch.stack(steps, 1).float() - logits.float()).abs().max() < 0.2
