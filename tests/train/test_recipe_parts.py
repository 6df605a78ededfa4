"""Unit tests of the training recipe's parts: LR schedule, parameter groups, loss + L2Wrap, estimate, config/CLI."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvkit.models import RWKVConfig, build_model
from rwkvkit.ops.testing import rel_rms
from rwkvkit.train.estimate import estimate, parse_count
from rwkvkit.train.loss import L2WRAP_FACTOR, lm_loss, reference_lm_loss
from rwkvkit.train.optim import build_optimizer, param_groups
from rwkvkit.train.schedule import lr_at

MINIPILE = dict(tokens_per_step=16 * 512, exit_tokens=1_498_226_207, lr_init=6e-4, lr_final=6e-5, warmup_steps=10)


@pytest.mark.parametrize("epoch, expected", [(0, 0.00059975), (1, 0.00059899), (5, 0.00059096), (11, 0.00056441)])
def test_schedule_matches_rwkv_lm_minipile_log(epoch, expected):
    # the lr column of RWKV-LM's reference train_log.txt (training_anchors 5.1): lr at the last step of each
    # 2520-step mini-epoch of the L12-D768 ctx512 bsz16 MiniPile run
    assert f"{lr_at((epoch + 1) * 2520 - 1, **MINIPILE):.8f}" == f"{expected:.8f}"


def test_schedule_shape():
    kw = dict(tokens_per_step=100, exit_tokens=100 * 110, lr_init=1e-3, lr_final=1e-4, warmup_steps=10)
    assert lr_at(0, **kw) == pytest.approx(1e-3 * 0.01)  # warmup starts at 1%
    assert lr_at(5, **kw) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts after warmup
    assert lr_at(60, **kw) == pytest.approx(0.5 * (1e-3 + 1e-4))  # half way: the mean
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    assert lr_at(500, **kw) == pytest.approx(1e-4)  # clamped past the end
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(50, **{**kw, "lr_final": 1e-3}) == 1e-3  # constant schedule


def test_parameter_groups_v7():
    model = build_model(RWKVConfig("7", 2, 64, 128, head_size=32))
    groups = param_groups(model.named_parameters(), weight_decay=0.1)
    by_name = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert len(by_name) == len(list(model.parameters()))
    assert by_name["blocks.0.att.w0"] == (2.0, 0.0)
    for name in ("emb.weight", "head.weight", "blocks.1.att.receptance.weight", "blocks.1.att.output.weight",
                 "blocks.0.ffn.key.weight", "blocks.0.ffn.value.weight"):
        assert by_name[name] == (1.0, 0.1), name
    for name in ("blocks.0.att.w1", "blocks.0.att.g2", "blocks.0.att.r_k", "blocks.0.att.ln_x.weight",
                 "blocks.0.ln1.weight", "blocks.0.att.x_r", "ln_out.bias"):
        assert by_name[name] == (1.0, 0.0), name


@pytest.mark.parametrize("version, name, scale", [("6", "blocks.0.att.time_decay", 2.0),
                                                   ("5.2", "blocks.1.att.time_decay", 2.0),
                                                   ("4", "blocks.0.att.time_first", 3.0)])
def test_parameter_groups_older_versions(version, name, scale):
    model = build_model(RWKVConfig(version, 2, 64, 128, head_size=32))
    by_name = {n: (g["lr_scale"], g["weight_decay"]) for g in param_groups(model.named_parameters(), 0.1)
               for n in g["names"]}
    assert by_name[name] == (scale, 0.0)
    assert by_name["blocks.0.att.key.weight"] == (1.0, 0.1)


def test_frozen_parameters_stay_out_of_the_optimizer():
    model = build_model(RWKVConfig("7", 2, 64, 128, head_size=32))
    for n, p in model.named_parameters():
        p.requires_grad_(".att." in n)
    opt = build_optimizer(model.named_parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-18, weight_decay=0.1)
    names = {n for g in opt.param_groups for n in g["names"]}
    assert names and all(".att." in n for n in names)


def _loss_inputs(seed=0, B=2, T=7, C=16, V=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, C, generator=g, requires_grad=True)
    w = (torch.randn(V, C, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, V, (B, T), generator=g)
    return h, w, t


@pytest.mark.parametrize("chunk", [0, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_loss_matches_autograd_reference(chunk, masked):
    h, w, t = _loss_inputs()
    mask = (torch.arange(7) % 3 != 0).float().expand(2, 7) if masked else None
    loss = lm_loss(h, w, t, mask, chunk=chunk)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = reference_lm_loss(h, w, t, mask)
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_fused_loss_in_bf16_on_cuda_accumulates_the_head_gradient_in_fp32():
    # CUDA adds each chunk's head-gradient product into the float32 sum in one cuBLAS call (`out_dtype`)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3000, 64, generator=g).cuda().requires_grad_()
    w = (torch.randn(500, 64, generator=g) * 0.3).cuda().requires_grad_()
    t = torch.randint(0, 500, (3000,), generator=g).cuda()
    gh, gw = torch.autograd.grad(lm_loss(h, w, t, chunk=700, compute_dtype=torch.bfloat16), (h, w))
    ref = reference_lm_loss(h, w, t)
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert gw.dtype == torch.float32
    assert rel_rms(gw, rw) < 1e-2 and rel_rms(gh, rh) < 1e-2


def test_loss_value_is_plain_cross_entropy_and_ignores_negative_targets():
    h, w, t = _loss_inputs()
    t[0, :3] = -100
    logits = h @ w.t()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), t.reshape(-1), ignore_index=-100)
    assert lm_loss(h, w, t).item() == pytest.approx(ce.item(), rel=1e-6)


def test_l2wrap_gradient_scales_with_the_incoming_gradient():
    # accumulation divides each micro-batch loss by N: the L2Wrap part of the gradient must shrink with it
    h, w, t = _loss_inputs()
    g1 = torch.autograd.grad(lm_loss(h, w, t), w)[0]
    g4 = torch.autograd.grad(lm_loss(h, w, t) / 4, w)[0]
    torch.testing.assert_close(g4 * 4, g1)
    # and it is exactly the gradient of 1e-4 * mean(max_logit^2 / 2) on top of the cross-entropy
    logits = h @ w.t()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), t.reshape(-1))
    aux = L2WRAP_FACTOR * (logits.max(-1).values ** 2 / 2).mean()
    torch.testing.assert_close(g1, torch.autograd.grad(ce + aux, w)[0], rtol=1e-5, atol=1e-8)


def test_estimate_reproduces_the_worked_example():
    e = estimate(parse_count("14B"), parse_count("300B"), peak_tflops=312)
    assert f"{e.flops:.2g}" == "2.5e+22"
    assert round(e.gpu_hours, -2) == 22_400
    assert e.train_state_gb == pytest.approx(14e9 * 16 / 1e9)
    half = estimate(14e9, 300e9, peak_tflops=312, mfu=0.5)
    assert half.gpu_hours == pytest.approx(2 * e.gpu_hours)


def test_estimate_cli(capsys):
    from rwkvkit.cli import main

    assert main(["estimate", "--model", "14B", "--tokens", "300B", "--gpu", "a100"]) == 0
    out = capsys.readouterr().out
    assert "2.52e+22" in out and "22,436" in out


def test_recipes_parse_and_match_the_size_ladder():
    from pathlib import Path

    from rwkvkit.train.pretrain import parse_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    shapes = {"v7-0.1b": (12, 768), "v7-0.4b": (24, 1024), "v7-1.5b": (24, 2048), "v7-3b": (32, 2560),
              "v7-7b": (32, 4096)}
    for name, (L, D) in shapes.items():
        cfg = parse_config(["--config", str(configs / f"{name}.yaml")])
        assert (cfg.model.version, cfg.model.n_layer, cfg.model.n_embd) == ("7", L, D), name
    tiny = parse_config(["--config", str(configs / "v7-tiny-cpu.yaml"), "--train.micro_bsz", "2"])
    assert tiny.train.micro_bsz == 2 and tiny.train.device == "cpu"
    assert math.isclose(parse_config([]).optim.adam_eps, 1e-18)


def test_compile_mode_comes_from_the_recipe_and_a_bad_one_is_named(capsys):
    from pathlib import Path

    from rwkvkit.train.pretrain import parse_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    assert parse_config(["--config", str(configs / "v7-0.1b.yaml")]).train.compile_mode == "reduce-overhead"
    assert parse_config(["--config", str(configs / "v7-1.5b.yaml")]).train.compile_mode == "default"
    with pytest.raises(SystemExit):
        parse_config(["--train.compile_mode", "bogus"])
    err = capsys.readouterr().err
    assert "train.compile_mode" in err and "reduce-overhead" in err and "bogus" in err
