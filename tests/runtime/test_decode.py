"""runtime.decode.Decoder: its steps equal the model's forward, streams stay independent, rows swap cleanly."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import random_v7, token_ids

from rwkvkit.errors import ConfigError, TokenizerError
from rwkvkit.runtime.decode import Decoder
from rwkvkit.runtime.generation import generate_tokens
from rwkvkit.runtime.sampling import SamplingParams

VERSIONS = ["4", "5.2", "6", "7"]





def _close(a, b, tol=1e-4):
    assert (a - b).abs().max().item() < tol * max(1.0, b.abs().max().item())


@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_steps_equal_forward_and_streams_are_independent(official_models, version):
    model = official_models[version]
    ids = token_ids(3, 12, seed=1)
    ref, ref_state = model(ids)
    dec = Decoder(model, batch_size=3)
    assert not dec.use_graph and not dec.use_compile  # CPU defaults
    steps = torch.stack([dec.step(ids[:, t]) for t in range(ids.shape[1])], 1)
    _close(steps, ref)
    _close(dec.state.wkv, ref_state.wkv)
    # one stream alone gives its row of the batched run
    alone = Decoder(model, batch_size=1)
    row = torch.stack([alone.step(ids[1, t : t + 1]) for t in range(ids.shape[1])], 1)
    _close(row[0], ref[1])


@torch.no_grad()
@pytest.mark.parametrize("version", ["6", "7"])
def test_prefill_then_steps_equal_forward_of_whole_sequence(official_models, version):
    model = official_models[version]
    ids = token_ids(2, 20, seed=2)
    ref, _ = model(ids)
    dec = Decoder(model, batch_size=2)
    logits = dec.prefill(ids[:, :15])
    _close(logits, ref[:, 14])
    for t in range(15, 20):
        _close(dec.step(ids[:, t]), ref[:, t])


@torch.no_grad()
def test_rows_swap_in_and_out(official_models):
    model = official_models["7"]
    a, b = token_ids(1, 10, seed=4)[0].tolist(), token_ids(1, 10, seed=5)[0].tolist()
    ref_a, state_a = model(a)
    ref_b, _ = model(b)
    dec = Decoder(model, batch_size=2)
    dec.prefill(a[:6], rows=[1])  # stream a in row 1, row 0 empty
    saved = dec.state.select(1)  # park stream a
    logits = dec.prefill(b[:6], rows=1)  # stream b takes row 1 ...
    _close(logits[0], ref_b[5])
    dec.load_state(saved, rows=[0])  # ... and a comes back in row 0
    for t in range(6, 10):
        out = dec.step([a[t], b[t]])
        _close(out[0], ref_a[t])
        _close(out[1], ref_b[t])
    _close(dec.state.select(0).wkv, state_a.wkv)
    dec.reset(rows=[0])
    _close(dec.step([a[0], b[0]])[0], ref_a[0])


def test_bad_input_is_a_clear_error(official_models):
    dec = Decoder(official_models["7"], batch_size=2)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        dec.step([1, 97])
    with pytest.raises(TokenizerError, match="2 integer token"):
        dec.step([1])
    with pytest.raises(ConfigError, match="rows"):
        dec.reset(rows=[2])
    with pytest.raises(ConfigError, match="cuda_graph"):
        Decoder(official_models["7"], cuda_graph=True)
    # prefill checks its prompts and state before running anything (also before any graph is recorded)
    with pytest.raises(ConfigError, match="prefill got 2 sequences for 1 rows"):
        dec.prefill(token_ids(2, 5), rows=[0])
    with pytest.raises(ConfigError, match="state has batch size 2 but the input has 1"):
        dec.prefill([1, 2, 3], official_models["7"].zero_state(2), rows=[1])
    with pytest.raises(TokenizerError, match="outside the vocabulary|token id 97"):
        dec.prefill([1, 97], rows=[1])
    with pytest.raises(TokenizerError, match="empty token sequence"):
        dec.prefill([], rows=[1])


@torch.no_grad()
def test_model_checks_cpu_ids_before_the_transfer(official_models):
    model = official_models["7"]
    with pytest.raises(TokenizerError, match="token id 97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(TokenizerError, match="token id -1"):
        model([3, -1])


@pytest.mark.slow
@torch.no_grad()
def test_compiled_layer_step_matches_eager_and_compiles_once():
    """The compiled path on CPU: layers > 0 share one compiled function (weights as arguments), layer 0 has one."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    model = random_v7(n_layer=4)
    ids = token_ids(1, 6, seed=6)
    ref, _ = model(ids)
    counters.clear()
    dec = Decoder(model, batch_size=1, compile=True)  # batch 1: with the matrix-vector pass
    steps = torch.stack([dec.step(ids[:, t]) for t in range(ids.shape[1])], 1)
    _close(steps, ref, tol=1e-3)
    assert counters["stats"]["unique_graphs"] == 2


@torch.no_grad()
def test_generation_is_unchanged_by_the_decoder_path(official_models):
    """generate_tokens on CPU keeps its traced step; greedy text from a prefill equals stepping by hand."""
    model = official_models["7"]
    prompt = token_ids(1, 8, seed=7)[0].tolist()
    chunks = list(generate_tokens(model, prompt, max_tokens=5, sampling=SamplingParams(temperature=0)))
    got = [t for c in chunks for t in c.tokens]
    dec = Decoder(model)
    logits = dec.prefill(prompt)[0]
    want = []
    for _ in range(5):
        want.append(int(logits.argmax()))
        logits = dec.step([want[-1]])[0]
    assert got == want


# ---------------------------------------------------------------- GPU


def _copy(model, dtype):
    import copy

    return copy.deepcopy(model).to(device="cuda", dtype=dtype)


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("version", ["6", "7"])
def test_cuda_graph_matches_eager(official_models, version, compile):
    model = _copy(official_models[version], torch.float32)
    ids = token_ids(4, 10, seed=8).cuda()
    eager = Decoder(model, batch_size=4, cuda_graph=False, compile=False)
    fast = Decoder(model, batch_size=4, cuda_graph=True, compile=compile, fused=False)  # fused: test_fused_step
    for t in range(ids.shape[1]):
        _close(fast.step(ids[:, t]), eager.step(ids[:, t]), tol=1e-3)
    _close(fast.state.wkv, eager.state.wkv, tol=1e-3)


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_cuda_graph_prefill_in_pieces_matches_eager(official_models, version):
    """Prompts of 256 + 128 + 37 tokens: two recorded pieces and an eager remainder, from a given state, into rows
    1 and 2 of 3; a second prompt replays the same graphs. Then a prompt of whole pieces only."""
    from rwkvkit.runtime.decode import PREFILL_PIECES

    assert PREFILL_PIECES[-2:] == (256, 128)
    model = _copy(official_models[version], torch.float32)
    _, start = model(token_ids(2, 10, seed=11).cuda())
    eager = Decoder(model, batch_size=3, cuda_graph=False, compile=False)
    fast = Decoder(model, batch_size=3, cuda_graph=True, compile=False, fused=False)
    for seed, T in ((12, 421), (13, 421), (14, 384)):
        ids = token_ids(2, T, seed=seed).cuda()
        _close(fast.prefill(ids, start, rows=[1, 2]), eager.prefill(ids, start, rows=[1, 2]), tol=1e-3)
        for name in ("att_x", "wkv", "ffn_x"):
            _close(getattr(fast.state, name), getattr(eager.state, name), tol=1e-3)
    assert sorted(fast._prefills[2].graphs) == [128, 256]
    _close(fast.step([1, 2, 3]), eager.step([1, 2, 3]), tol=1e-3)


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_fp16_graph_decode_tracks_fp32(official_models, fused):
    ref_model = _copy(official_models["7"], torch.float32)
    model = _copy(official_models["7"], torch.float16)
    ids = token_ids(1, 30, seed=9).cuda()
    ref, _ = ref_model(ids)
    # defaults on CUDA: graph + the fused step; without it graph + compile (batch 1: the matrix-vector pass)
    dec = Decoder(model, fused="auto" if fused else False)
    assert dec.use_graph and (dec.use_fused if fused else dec.use_compile)
    logits = dec.prefill(ids[:, :20])
    steps = [logits] + [dec.step(ids[:, t]) for t in range(20, 30)]
    got = torch.stack(steps, 1).float()
    rel = (got - ref[:, 19:]).norm() / ref[:, 19:].norm()
    assert rel < 2e-2


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_generation_uses_the_graph_and_keeps_its_tokens(official_models):
    model = _copy(official_models["7"], torch.float32)
    prompt = token_ids(1, 8, seed=10)[0].tolist()
    chunks = list(generate_tokens(model, prompt, max_tokens=6, sampling=SamplingParams(temperature=0)))
    got = [t for c in chunks for t in c.tokens]
    ids, state, want = torch.tensor([prompt], device="cuda"), None, []
    for _ in range(6):
        logits, state = model(ids, state)
        want.append(int(logits[0, -1].argmax()))
        ids = torch.tensor([[want[-1]]], device="cuda")
    assert got == want
    _, state = model(ids, state)  # the final state has taken the last token too
    _close(chunks[-1].state.wkv, state.wkv, tol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("version", ["4", "7"])
def test_prefill_of_prompts_of_different_lengths_packs_them(official_models, version):
    """Prompts of different lengths for several rows run as packed sequences in one forward: each row's logits and
    state are those of its prompt alone, from the empty state or from a given one; equal lengths take the [R, T]
    path."""
    model = official_models[version]
    prompts = [token_ids(1, n, seed=10 + n)[0].tolist() for n in (7, 1, 12)]
    start = model(token_ids(3, 4, seed=9))[1]
    for state in (None, start):
        dec = Decoder(model, batch_size=4)
        logits = dec.prefill([prompts[0], torch.tensor(prompts[1]), prompts[2]], state, rows=[3, 0, 1])
        for i, (prompt, row) in enumerate(zip(prompts, [3, 0, 1])):
            alone, alone_state = model(prompt, None if state is None else state.select(i))
            _close(logits[i], alone[-1])
            _close(dec.state.select(row).wkv, alone_state.wkv)
            _close(dec.state.select(row).att_x, alone_state.att_x)
        assert torch.equal(dec.state.select(2).wkv, model.zero_state().wkv)  # untouched row
    same = Decoder(model, batch_size=2).prefill([prompts[2], prompts[2][::-1]])
    _close(same[0], model(prompts[2])[0][-1])


def test_packed_prefill_checks_every_prompt_first(official_models):
    dec = Decoder(official_models["7"], batch_size=2)
    with pytest.raises(ConfigError, match="prefill got 3 sequences for 2 rows"):
        dec.prefill([[1, 2], [3], [4, 5, 6]])
    with pytest.raises(TokenizerError, match="empty token sequence"):
        dec.prefill([[1, 2], []])
    with pytest.raises(TokenizerError, match="token id 97"):
        dec.prefill([[1, 2], [3, 97, 4]])
    with pytest.raises(TokenizerError, match="one sequence"):
        dec.prefill([[1, 2], torch.tensor([[3], [4]])])
