"""The fused RWKV-7 decoding step (rwkvkit.ops.v7_step) against the model's own forward: logits and state.

Without a GPU its Triton kernels run in the CPU interpreter on a float32 model (then they must agree to float32
rounding); on a GPU also in float16 inside the Decoder's CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import random_v7, token_ids
from triton_interpreter import device_for_kernel_tests

DEVICE = device_for_kernel_tests("rwkvkit.ops.v7_step.triton_fused")

from rwkvkit.errors import ConfigError  # noqa: E402
from rwkvkit.ops.testing import rel_rms  # noqa: E402
from rwkvkit.runtime.decode import Decoder  # noqa: E402


def odd_ranks_v7():
    """Widths that are not multiples of the row blocks: LoRAs, vocabulary, n_embd 80 (5 heads of 16)."""
    return random_v7(2, seed=1, n_embd=80, w_lora=24, a_lora=8, v_lora=40, g_lora=20)


def int8_v7():
    from rwkvkit.runtime.quant import quantize_int8

    return quantize_int8(random_v7(2))


def fused_steps(model, ids, prompt: int, **decoder_options):
    """Prefill ids[:, :prompt] (GPT mode), then step the rest through the fused step: (logits [B, T', V], state)."""
    dec = Decoder(model, batch_size=ids.shape[0], fused=True, **decoder_options)
    assert dec.use_fused and not dec.use_compile
    dec.prefill(ids[:, :prompt])
    steps = torch.stack([dec.step(ids[:, t]) for t in range(prompt, ids.shape[1])], 1)
    return steps, dec.state


@torch.no_grad()
@pytest.mark.parametrize("make, batch, prompt", [(lambda: random_v7(3), 1, 4), (lambda: random_v7(3), 2, 1),
                                                 (odd_ranks_v7, 3, 5), (int8_v7, 2, 3)])
def test_fused_steps_equal_forward(make, batch, prompt):
    model = make().to(DEVICE)
    ids = token_ids(batch, prompt + 4, seed=batch).to(DEVICE)
    ref, ref_state = model(ids)
    steps, state = fused_steps(model, ids, prompt, cuda_graph=False)
    assert torch.isfinite(steps).all()
    assert rel_rms(steps, ref[:, prompt:]) < 1e-5
    for name in ("att_x", "wkv", "ffn_x"):
        assert rel_rms(getattr(state, name), getattr(ref_state, name)) < 1e-5, name


@torch.no_grad()
def test_fused_step_with_other_tilings():
    """Row blocks that do not divide n_embd or dim_ffn, loads wider than the input, more warps."""
    from rwkvkit.ops.v7_step.triton_fused import FusedStepV7, StepConfig, Tiling

    model = odd_ranks_v7().to(DEVICE)
    ids = token_ids(2, 3, seed=9).to(DEVICE)
    ref, ref_state = model(ids)
    config = StepConfig(ln_in=Tiling(32, 64, 4), residual=Tiling(32, 512, 2), head=Tiling(64, 16, 1), core_warps=2)
    step, state = FusedStepV7(model, 2, config), model.zero_state(2)
    got = torch.stack([step.step(ids[:, t : t + 1].contiguous(), state).clone() for t in range(3)], 1)
    assert rel_rms(got, ref) < 1e-5
    assert rel_rms(state.wkv, ref_state.wkv) < 1e-5
    with pytest.raises(ConfigError, match="powers of two"):
        Tiling(48, 512, 4)


@torch.no_grad()
def test_fused_step_reads_weights_in_place():
    """No weight copies: a weight changed in place after the decoder was built is what the next step uses."""
    model = random_v7(2).to(DEVICE)
    ids = token_ids(1, 3, seed=7).to(DEVICE)
    dec = Decoder(model, fused=True, cuda_graph=False)
    model.blocks[1].att.g1.mul_(3.0)
    model.blocks[0].ffn.value.weight.mul_(-1.0)
    ref, _ = model(ids)
    steps = torch.stack([dec.step(ids[:, t]) for t in range(3)], 1)
    assert rel_rms(steps, ref) < 1e-5


def test_fused_choice_and_errors(official_models):
    model = random_v7(1)
    assert not Decoder(model).use_fused  # CPU: "auto" keeps the model's step
    with pytest.raises(ConfigError, match="int8"):
        from rwkvkit.runtime.quant import Int8Linear

        half_quantized = random_v7(1).to(DEVICE)
        half_quantized.head = Int8Linear(half_quantized.head)
        Decoder(half_quantized, fused=True, cuda_graph=False)
    with pytest.raises(ConfigError, match="RWKV-7"):
        Decoder(official_models["6"].to(DEVICE), fused=True, cuda_graph=False)
    if DEVICE == "cpu":
        assert Decoder(model, fused=True).use_fused  # the interpreter runs it
    strided = random_v7(1).to(DEVICE)
    strided.blocks[0].att.key.weight.data = strided.blocks[0].att.key.weight.data.t().contiguous().t()
    with pytest.raises(ConfigError, match="blocks.0.att.key.weight is not"):
        Decoder(strided, fused=True, cuda_graph=False)
    if DEVICE == "cuda":
        assert not Decoder(strided).use_fused  # "auto" falls back to the model's step
    with pytest.raises(ConfigError, match="exclude"):
        Decoder(model.to(DEVICE), fused=True, compile=True)
    if DEVICE == "cuda":
        assert not Decoder(model, compile=True).use_fused  # an explicit compile=True keeps the compiled layers


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_graph_steps_in_half_precision_are_as_close_to_float32_as_the_model(dtype):
    """Inside the Decoder's CUDA graph; measured against the float32 model, next to the model's own half run."""
    import copy

    model = random_v7(4).to(DEVICE)
    ids = token_ids(2, 12, seed=3).to(DEVICE)
    ref, ref_state = model(ids)
    half = copy.deepcopy(model).to(dtype)
    eager, _ = half(ids)
    steps, state = fused_steps(half, ids, 6)  # CUDA graph on
    assert Decoder(half, batch_size=2).use_fused  # the "auto" choice on CUDA
    eager_err = rel_rms(eager[:, 6:].float(), ref[:, 6:])
    assert rel_rms(steps.float(), ref[:, 6:]) < 1.5 * eager_err
    assert rel_rms(state.wkv, ref_state.wkv) < 10 * eager_err


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@torch.no_grad()
def test_programmatic_dependent_launch_changes_no_bit():
    """Kernels that start early (PDL) must read nothing before their inputs are ready: same bits as without it."""
    from rwkvkit.ops.v7_step.triton_fused import FusedStepV7, StepConfig

    model = random_v7(3).to(DEVICE, torch.float16)
    ids = token_ids(2, 16, seed=4).to(DEVICE)
    runs = []
    for pdl in (False, True):
        dec = Decoder(model, batch_size=2, fused=True)
        dec._fused = FusedStepV7(model, 2, StepConfig(pdl=pdl))
        runs.append((torch.stack([dec.step(ids[:, t]) for t in range(16)], 1), dec.state.wkv))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
