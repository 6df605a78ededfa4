"""Model behaviour on tiny random official-layout checkpoints: GPT mode == RNN mode, state continuity, batching,
input handling, dtypes, State utilities and the pretraining inits."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvkit.errors import ConfigError, TokenizerError
from rwkvkit.models import RWKVConfig, State, build_model
from rwkvkit.models.checkpoint import load_checkpoint
from rwkvkit.ops.varlen import cu_seqlens_of

VERSIONS = ["4", "5.2", "6", "7"]
V = 97  # the tiny checkpoints' vocab (see tests/support/official_checkpoints.py TINY)


@pytest.fixture(params=VERSIONS)
def model(request, make_checkpoint):
    return load_checkpoint(make_checkpoint(request.param)).eval()


def _tokens(batch, length, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_gpt_mode_equals_rnn_mode(model):
    idx = _tokens(1, 24)
    logits, state = model(idx)
    rnn_state = None
    for t in range(idx.shape[1]):
        step, rnn_state = model(idx[:, t : t + 1], rnn_state)
        torch.testing.assert_close(step[:, 0], logits[:, t], atol=2e-5, rtol=0)
    for name in ("att_x", "wkv", "ffn_x"):
        torch.testing.assert_close(getattr(rnn_state, name), getattr(state, name), atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_state_continuity(model):
    idx = _tokens(1, 30, seed=2)
    full, full_state = model(idx)
    _, state_a = model(idx[:, :17])
    tail, tail_state = model(idx[:, 17:], state_a)
    torch.testing.assert_close(tail, full[:, 17:], atol=2e-5, rtol=0)
    torch.testing.assert_close(tail_state.wkv, full_state.wkv, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_batch_equals_single_runs(model):
    idx = _tokens(2, 20, seed=3)
    logits, state = model(idx)
    for b in range(2):
        single, single_state = model(idx[b : b + 1])
        torch.testing.assert_close(logits[b : b + 1], single, atol=2e-5, rtol=0)
        torch.testing.assert_close(state.select(b).wkv, single_state.wkv, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_given_state_is_not_modified(model):
    _, state = model(_tokens(1, 8))
    before = state.clone()
    model(_tokens(1, 5, seed=4), state)
    for name in ("att_x", "wkv", "ffn_x"):
        assert torch.equal(getattr(state, name), getattr(before, name))


@torch.no_grad()
def test_hidden_is_the_head_input(model):
    idx = _tokens(2, 6)
    hidden, _ = model.hidden(idx)
    logits, _ = model(idx)
    assert hidden.shape == (2, 6, model.config.n_embd)
    torch.testing.assert_close(model.head(hidden), logits)


@torch.no_grad()
def test_input_forms_and_bad_ids(make_checkpoint):
    model = load_checkpoint(make_checkpoint("7")).eval()
    ids = [5, 7, 11]
    from_list, state = model(ids)
    from_1d, _ = model(torch.tensor(ids, dtype=torch.int32))
    from_2d, _ = model(torch.tensor([ids]))
    assert from_list.shape == (3, V) and state.batch_size == 1
    torch.testing.assert_close(from_list, from_2d[0])
    torch.testing.assert_close(from_1d, from_2d[0])
    for bad in ([1, V], [-1], torch.tensor([[0, V + 5]]), []):
        with pytest.raises(TokenizerError):
            model(bad)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        model([3, 200])
    with pytest.raises(ConfigError, match="batch size"):
        model(torch.tensor([[1], [2]]), state)


@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_bf16_weights_keep_fp32_state(make_checkpoint, version):
    path = make_checkpoint(version)
    ref, _ = load_checkpoint(path).eval()(_tokens(1, 12))
    model = load_checkpoint(path, dtype=torch.bfloat16).eval()
    logits, state = model(_tokens(1, 12))
    assert logits.dtype == torch.bfloat16 and state.wkv.dtype == torch.float32
    assert state.att_x.dtype == torch.bfloat16
    # bf16 has ~3 significant digits; the point is that nothing overflows or drifts
    assert (logits.float() - ref).abs().max() < 0.25


def test_v7_hands_the_wkv_op_the_autocast_dtype(monkeypatch):
    # fp32 parameters promote k, v, a, b and the log decay to fp32 under autocast; the op gets them in bf16 (as the
    # official trainer's kernels do), while a plain fp32 forward keeps them in fp32
    import rwkvkit.models.v7 as v7

    seen = []

    def spy(*args, **kwargs):
        seen.append([t.dtype for t in args])
        return real(*args, **kwargs)

    real = v7.wkv7
    monkeypatch.setattr(v7, "wkv7", spy)
    model = build_model(RWKVConfig("7", 1, 32, V, head_size=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(_tokens(1, 5))[0].float().sum().backward()
    model(_tokens(1, 5))
    assert seen == [[torch.bfloat16] * 6, [torch.float32] * 6]


def test_v7_tells_the_wkv_op_the_bound_of_its_log_decay(monkeypatch):
    # the Triton path then need not wait for the GPU to find w's minimum (its kernels take w >= -4.2)
    import math

    import rwkvkit.models.v7 as v7

    seen = []

    def spy(r, w, *args, **kwargs):
        seen.append((w.min().item(), kwargs.get("log_decay_min")))
        return real(r, w, *args, **kwargs)

    real = v7.wkv7
    monkeypatch.setattr(v7, "wkv7", spy)
    model = build_model(RWKVConfig("7", 2, 32, V, head_size=16))
    with torch.no_grad():
        for p in model.parameters():  # strong decays too: w0 large makes sigmoid(w_raw) close to 1
            p.add_(torch.randn_like(p) * 3)
    model(_tokens(1, 9))
    assert len(seen) == 2
    for lowest, bound in seen:
        assert bound == -math.exp(-0.5) and bound - 1e-6 <= lowest < 0  # (float32 rounding of the bound)


@pytest.mark.parametrize("version", VERSIONS)
def test_layer_norm_outputs_take_the_autocast_dtype_and_the_residual_stays_fp32(version):
    # under autocast LayerNorm returns fp32; its outputs only feed 16-bit matmuls, so they are 16-bit from the start
    model = build_model(RWKVConfig(version, 1, 32, V, head_size=16))
    block, state = model.blocks[0], model.zero_state(1)
    x = torch.randn(1, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_out, xf, att_last, _, _ = block.time_mix_residual(x, state.att_x[0], state.wkv[0], None)
    assert x_out.dtype == torch.float32 and xf.dtype == att_last.dtype == torch.bfloat16


def test_state_save_load_and_utilities(tmp_path, make_checkpoint):
    model = load_checkpoint(make_checkpoint("6")).eval()
    with torch.no_grad():
        _, state = model(_tokens(2, 5))
    state.save(tmp_path / "s.safetensors")
    back = State.load(tmp_path / "s.safetensors")
    assert back.version == "6" and back.batch_size == 2
    assert torch.equal(back.wkv, state.wkv) and torch.equal(back.att_x, state.att_x)
    assert torch.equal(State.cat([state.select(0), state.select(1)]).wkv, state.wkv)
    assert state.to(dtype=torch.bfloat16).wkv.dtype == torch.float32
    zeros = State.zeros(model.config, 3)
    assert zeros.wkv.shape == (2, 3, 4, 16, 16)
    buffers = State.zeros(model.config, 2)
    wkv_buffer = buffers.wkv
    assert buffers.copy_(state) is buffers and buffers.wkv is wkv_buffer  # in place, into its own tensors
    assert torch.equal(buffers.wkv, state.wkv) and torch.equal(buffers.ffn_x, state.ffn_x)
    with pytest.raises(ConfigError, match="different model or batch size"):
        zeros.copy_(state)
    v4 = State.zeros(RWKVConfig("4", n_layer=2, n_embd=64, vocab_size=V), 1)
    assert v4.wkv.shape == (2, 1, 3, 64) and (v4.wkv[:, :, 2] < -1e37).all()
    with pytest.raises(ConfigError, match="RWKV-6"):
        load_checkpoint(make_checkpoint("7")).eval()([1], state.select(0))


def test_config_defaults_and_round_trip():
    cfg = RWKVConfig("7", n_layer=12, n_embd=768, vocab_size=65536)
    assert (cfg.w_lora, cfg.a_lora, cfg.v_lora, cfg.g_lora) == (64, 64, 32, 128)
    assert cfg.dim_ffn == 3072 and cfg.n_head == 12
    assert RWKVConfig("7", n_layer=24, n_embd=2048, vocab_size=65536).lora_dims() == {
        "w_lora": 128, "a_lora": 128, "v_lora": 64, "g_lora": 224
    }  # fmt: skip
    assert RWKVConfig("6", n_layer=12, n_embd=768, vocab_size=65536).dim_ffn == 2688
    for version in VERSIONS:
        cfg = RWKVConfig(version, n_layer=2, n_embd=64, vocab_size=V, head_size=16)
        assert RWKVConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="5.1"):
        RWKVConfig("5.1", n_layer=2, n_embd=64, vocab_size=V)


def test_official_parameter_counts():
    """Section 2.6 of the training notes: L12-D768 counts of the four versions (built on the meta device)."""
    expected = {
        ("7", 65536): 191_084_544,
        ("6", 65536): 196_955_136,
        ("5.2", 65536): 192_807_936,
        ("4", 50277): 169_342_464,
    }
    for (version, vocab), count in expected.items():
        with torch.device("meta"):
            model = build_model(RWKVConfig(version, n_layer=12, n_embd=768, vocab_size=vocab))
        assert model.num_params() == count, version


@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_init_weights_follow_the_official_recipe(version):
    torch.manual_seed(0)
    cfg = RWKVConfig(version, n_layer=3, n_embd=64, vocab_size=V, head_size=16)
    model = build_model(cfg, init=True).eval()
    blocks = model.blocks
    assert model.emb.weight.abs().max() <= 1e-4
    assert torch.count_nonzero(blocks[1].att.output.weight) == 0
    assert torch.count_nonzero(blocks[1].ffn.value.weight) == 0
    head = model.head.weight
    gain = 0.5 * math.sqrt(V / 64)  # orthogonal rows scaled by the gain (V > C: orthonormal columns)
    torch.testing.assert_close(head.T @ head, gain**2 * torch.eye(64), atol=1e-4, rtol=1e-4)
    if version != "4":
        torch.testing.assert_close(blocks[2].att.ln_x.weight, torch.ones(64))  # ((1+2)/3)^0.7
        torch.testing.assert_close(blocks[0].att.ln_x.weight, torch.full((64,), (1 / 3) ** 0.7))
    if version == "7":
        assert torch.all(blocks[0].att.k_a == 1.02) and torch.all(blocks[0].att.r_k == -0.04)
        assert torch.count_nonzero(blocks[0].att.w1) == 0 and torch.count_nonzero(blocks[0].att.w2) > 0
    if version in ("5.2", "6"):
        decay = blocks[0].att.time_decay.flatten()
        assert decay[0] == -6 and torch.isclose(decay[-1], torch.tensor(-1.0))
    logits, _ = model(_tokens(2, 16))
    # near-uniform predictions at init: the loss starts close to ln(V)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), _tokens(2, 16, seed=5).flatten())
    assert abs(loss.item() - math.log(V)) < 0.5


PACKED_LENGTHS = (7, 0, 12, 1, 5)  # an empty and a one-token sequence among them


@torch.no_grad()
def test_packed_sequences_equal_each_sequence_alone(model):
    """Sequences packed in one row (cu_seqlens) give each sequence's logits and final state as if it ran alone,
    from zero states and from a state per sequence: the token shift restarts at every boundary as the WKV does."""
    cu = cu_seqlens_of(PACKED_LENGTHS)
    idx = _tokens(1, sum(PACKED_LENGTHS), seed=5)
    _, given = model(_tokens(len(PACKED_LENGTHS), 3, seed=6))
    for state in (None, given):
        logits, packed_state = model(idx, state, cu_seqlens=cu)
        assert packed_state.batch_size == len(PACKED_LENGTHS)
        for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            own = model.zero_state() if state is None else state.select(i)
            if end > start:
                alone, own = model(idx[:, start:end], own)
                torch.testing.assert_close(logits[:, start:end], alone, atol=2e-5, rtol=0)
            for name in ("att_x", "wkv", "ffn_x"):
                torch.testing.assert_close(getattr(packed_state.select(i), name), getattr(own, name),
                                           atol=2e-5, rtol=1e-5)


def test_packed_sequences_gradients_equal_the_sum_over_sequences(model):
    cu = cu_seqlens_of(PACKED_LENGTHS)
    idx = _tokens(1, sum(PACKED_LENGTHS), seed=7)
    weight = torch.randn(1, idx.shape[1], V, generator=torch.Generator().manual_seed(8))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed = grads((model(idx, cu_seqlens=cu)[0] * weight).sum())
    loss = sum((model(idx[:, s:e])[0] * weight[:, s:e]).sum()
               for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s)
    alone = grads(loss)
    assert packed.keys() == alone.keys()
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], atol=1e-4, rtol=1e-4, msg=name)


def test_packed_token_shift_equals_each_sequence_shifted_alone():
    """The packed token shift and the state it leaves, values and gradients of x and of every sequence's x_prev
    (empty sequences included), equal each sequence shifted on its own, with deterministic algorithms on (empty
    sequences share the spare row their x_prev is copied onto)."""
    from rwkvkit.models.common import Packing, last_token, token_shift
    from rwkvkit.ops.testing import PACKED_LENGTHS

    cu = cu_seqlens_of(PACKED_LENGTHS)
    total, n, C = sum(PACKED_LENGTHS), len(PACKED_LENGTHS), 6
    x = torch.randn(1, total, C, dtype=torch.float64, requires_grad=True)
    x_prev = torch.randn(n, C, dtype=torch.float64, requires_grad=True)
    grads = torch.randn(1, total, C, dtype=torch.float64), torch.randn(n, C, dtype=torch.float64)

    def alone():
        rows = [(x[:, a:b], x_prev[i:i + 1]) for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist()))]
        shifted = torch.cat([token_shift(xs, xp) for xs, xp in rows if xs.shape[1]], 1)
        return shifted, torch.cat([xs[:, -1] if xs.shape[1] else xp for xs, xp in rows])

    def values_and_grads(outputs):
        torch.autograd.backward(outputs, grads)
        out = [o.detach() for o in outputs] + [x.grad.clone(), x_prev.grad.clone()]
        x.grad = x_prev.grad = None
        return out

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        packing = Packing.build(cu, total, x.device)
        got = values_and_grads((token_shift(x, x_prev, packing), last_token(x, x_prev, packing)))
        want = values_and_grads(alone())
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for name, g, w in zip(["shifted", "last", "dx", "dx_prev"], got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


@torch.no_grad()
def test_packed_sequences_input_forms_and_errors(make_checkpoint):
    model = load_checkpoint(make_checkpoint("7")).eval()
    cu = cu_seqlens_of((3, 4))
    idx = _tokens(1, 7)
    logits, state = model(idx[0], cu_seqlens=cu)  # 1-D ids: logits [T, V], one state row per sequence
    assert logits.shape == (7, V) and state.batch_size == 2
    with pytest.raises(ConfigError, match="one batch row"):
        model(_tokens(2, 7), cu_seqlens=cu)
    with pytest.raises(ConfigError, match="from 0 to T_total = 7"):
        model(idx, cu_seqlens=cu_seqlens_of((3, 5)))
    with pytest.raises(ConfigError, match="batch size 1 but the input has 2"):
        model(idx, model.zero_state(1), cu_seqlens=cu)


def test_run_unchecked_refuses_a_layer_step_with_packed_sequences(model):
    """run_block (the decoder's compiled layer steps) takes ordinary rows: packed input must not skip it silently."""
    from rwkvkit.models.common import Packing

    cu = cu_seqlens_of(PACKED_LENGTHS)
    idx = _tokens(1, sum(PACKED_LENGTHS), seed=5)
    with pytest.raises(ValueError, match="run_block or packing, not both"):
        model.run_unchecked(idx, run_block=lambda i, *args: None, packing=Packing.build(cu, idx.shape[1], idx.device))
