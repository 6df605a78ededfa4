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
    # the Triton WKV kernels multiply operands rounded to a 10-bit mantissa (tf32, or fp16 for 16-bit inputs) on the
    # tensor cores (docs/gpu.md): ~1e-3 relative
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


PACKED_LENGTHS = (130, 0, 67, 1, 90)  # 288 tokens: the WKV kernels' path (T >= KERNEL_MIN_T)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cu_on", ["cpu", "cuda"])
def test_cuda_packed_sequences_match_cpu(make_checkpoint, version, cu_on):
    """Packed sequences through the GPU kernels (tables from CPU or GPU cu_seqlens) against the CPU model, which
    runs each sequence alone: logits, states and parameter gradients."""
    from rwkvkit.ops.varlen import cu_seqlens_of

    path = make_checkpoint(version, head_size=64) if version != "4" else make_checkpoint(version)
    cu = cu_seqlens_of(PACKED_LENGTHS)
    idx = _tokens(1, sum(PACKED_LENGTHS), seed=2)
    results = []
    for device in ("cpu", "cuda"):
        model = load_checkpoint(path, device=device)
        _, state = model(_tokens(len(PACKED_LENGTHS), 3, seed=3).to(device))
        logits, state = model(idx.to(device), state.detach(), cu_seqlens=cu.to(device if cu_on == "cuda" else "cpu"))
        (logits.float().square().mean() + state.wkv.square().mean()).backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach().cpu(), state.wkv.detach().cpu(), grads))
    (ref, ref_wkv, ref_grads), (out, wkv, grads) = results
    assert rel_rms(out, ref) < 3e-3
    assert rel_rms(wkv, ref_wkv) < 3e-3
    for name, g in ref_grads.items():
        if g.norm() > 0:
            assert rel_rms(grads[name], g) < 1e-2, name


def test_packed_compiled_blocks_match_eager():
    """compile_blocks with packed sequences: the WKV7 op stays one opaque call (no graph breaks) and the loss and
    gradients equal eager ones."""
    import torch._dynamo.utils

    from rwkvkit.models import RWKVConfig, build_model
    from rwkvkit.ops.varlen import cu_seqlens_of

    torch.manual_seed(0)
    model = build_model(RWKVConfig("7", 3, 256, 97, head_size=64), init=True).cuda()
    cu = cu_seqlens_of(PACKED_LENGTHS).cuda()
    idx = _tokens(1, sum(PACKED_LENGTHS), seed=4).cuda()

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(idx, cu_seqlens=cu)
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), idx[0, 1:])
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_eager, grads_eager = loss_and_grads()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile_blocks()
    loss_compiled, grads_compiled = loss_and_grads()
    assert not torch._dynamo.utils.counters["graph_break"]
    assert abs(loss_compiled - loss_eager) < 1e-2
    for g, g0 in zip(grads_compiled, grads_eager):
        assert (g - g0).norm() <= 2e-2 * g0.norm() + 1e-6
