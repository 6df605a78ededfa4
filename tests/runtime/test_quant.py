"""Weight-only int8: close to the float model, same results through the Decoder (eager and compiled), via strategy."""

from __future__ import annotations

import copy

import pytest
import torch
from runtime_helpers import random_v7, token_ids

from rwkvkit.ops.testing import rel_rms
from rwkvkit.runtime.decode import Decoder
from rwkvkit.runtime.quant import Int8Linear, quantize_int8

VERSIONS = ["4", "5.2", "6", "7"]





def test_int8_linear_rounds_each_row_to_its_own_scale():
    linear = torch.nn.Linear(40, 6, bias=False)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127 and q.scale.shape == (6,)
    w = linear.weight.detach()
    dequant = q.weight.float() * q.scale[:, None]
    assert ((dequant - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()  # within half a step, row by row
    x = torch.randn(3, 40)
    assert torch.allclose(q(x), x @ dequant.t(), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_quantized_model_stays_close_to_the_float_one(official_models, version):
    model = official_models[version]
    quant = quantize_int8(copy.deepcopy(model))
    linears = [m for m in quant.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears and any(isinstance(m, Int8Linear) for m in quant.modules())
    ids = token_ids(2, 12, seed=1)
    ref, _ = model(ids)
    got, _ = quant(ids)
    assert rel_rms(got, ref) < 2e-2


@torch.no_grad()
def test_decoder_steps_of_a_quantized_model_equal_its_forward():
    """Including the compiled layer step, whose per-layer weights are the Int8Linear parameters."""
    pytest.importorskip("torch._inductor")
    model = random_v7(n_layer=3)
    quantize_int8(model)
    ids = token_ids(1, 5, seed=2)
    ref, _ = model(ids)
    for compile in (False, True):
        dec = Decoder(model, batch_size=1, compile=compile)
        steps = torch.stack([dec.step(ids[:, t]) for t in range(ids.shape[1])], 1)
        assert (steps - ref).abs().max() < 1e-3 * max(1.0, ref.abs().max().item()), compile


def test_compat_strategy_i8_runs_the_quantized_model(tmp_path):
    from runtime_helpers import official_state_dict

    from rwkvkit.compat import RWKV

    path = tmp_path / "v7.pth"
    torch.save(official_state_dict("7", seed=5), path)
    plain, quant = RWKV(model=str(path), strategy="cpu fp32"), RWKV(model=str(path), strategy="cpu fp32i8")
    assert any(isinstance(m, Int8Linear) for m in quant.model.modules())
    ids = token_ids(1, 9, seed=3)[0].tolist()
    a, _ = plain.forward(ids, None)
    b, _ = quant.forward(ids, None)
    assert rel_rms(b, a) < 2e-2
    import rwkvkit

    loaded = rwkvkit.load(path, int8=True)  # the one place generate --int8 and the compat i8 go through
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == sum(
        isinstance(m, Int8Linear) for m in quant.model.modules())


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_bf16_cpu_products_equal_the_widened_weight_product(rows):
    """Few rows take PyTorch's fused int8 product, many rows the widened weight: the same numbers either way."""
    q = Int8Linear(torch.nn.Linear(96, 80, bias=False).to(torch.bfloat16))
    x = torch.randn(1, rows, 96).to(torch.bfloat16)
    want = x.float() @ (q.weight.float() * q.scale.float()[:, None]).t()
    got = q(x)
    assert got.shape == (1, rows, 80) and got.dtype == torch.bfloat16
    assert rel_rms(got, want) < 1e-2


def test_fp16_outputs_do_not_overflow():
    """Large activations with small weights (as in RWKV's FFN): products in int8 units, scaled afterwards, would
    pass fp16's 65504 (here 40 x 256 x 127); scaled first they stay what they are."""
    linear = torch.nn.Linear(256, 4, bias=False)
    with torch.no_grad():
        linear.weight.uniform_(-0.05, 0.05)
    q = Int8Linear(linear.half())
    x = torch.full((1, 256), 40.0)
    got = q(x.half()).float()
    assert torch.isfinite(got).all()
    assert rel_rms(got, x @ linear.weight.float().t()) < 2e-2
