import copy

import pytest
import torch

from rwkvkit.compat import PIPELINE, PIPELINE_ARGS, RWKV
from rwkvkit.errors import CheckpointError, ConfigError, TokenizerError

VERSIONS = ["4", "5.2", "6", "7"]
PROMPT = [5, 17, 3, 42, 8, 96, 0, 11, 23]
STEPS = [7, 7, 64, 1, 30]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """{version: (checkpoint path, the official package's results on it)}."""
    from runtime_helpers import official_state_dict, run_official

    workdir = tmp_path_factory.mktemp("official")
    paths = {}
    for version in VERSIONS:
        paths[version] = workdir / f"tiny-v{version}.pth"
        torch.save(official_state_dict(version), paths[version])
    results = run_official(workdir, paths, PROMPT, STEPS)
    return {v: (paths[v], results[v]) for v in VERSIONS}


@pytest.mark.parametrize("version", VERSIONS)
def test_chatrwkv_loop_matches_the_official_package(version, official):
    path, reference = official[version]

    model = RWKV(model=str(path.with_suffix("")), strategy="cpu fp32")  # without .pth, as ChatRWKV scripts do
    out, state = model.forward(PROMPT, None, full_output=True)
    logits = [out]
    for token in STEPS:
        out, state = model.forward([token], state)
        logits.append(out)

    assert logits[0].shape == (len(PROMPT), 97) and logits[1].shape == (97,)
    for ours, ref in zip(logits, reference["logits"]):
        assert ours.dtype == torch.float32
        assert (ours - ref).abs().max() <= 1e-4
    assert len(state) == len(reference["state"]) == 2 * (5 if version == "4" else 3)
    for ours, ref in zip(state, reference["state"]):
        assert ours.shape == ref.shape
        # v4's empty-history marker pp is -1e30 officially and -1e38 here; it is overwritten after one token
        assert torch.allclose(ours.float(), ref, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def v6_model(tmp_path_factory):
    from runtime_helpers import official_state_dict

    path = tmp_path_factory.mktemp("compat") / "v6.pth"
    torch.save(official_state_dict("6"), path)
    return RWKV(model=str(path), strategy="cpu fp32", verbose=False)


def test_chunked_prefill_equals_one_call_and_old_states_stay_valid(v6_model):
    full, _ = v6_model.forward(PROMPT, None)
    out, state = v6_model.forward(PROMPT[:4], None)
    saved = copy.deepcopy(state)
    snapshot = [t.clone() for t in state]
    held = list(state)
    out, state2 = v6_model.forward(PROMPT[4:], state)
    assert state2 is state  # the official contract: the list is filled in place and returned
    assert torch.allclose(out, full, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(held, snapshot))  # the tensors it held were not modified
    again, _ = v6_model.forward(PROMPT[4:], saved)
    assert torch.allclose(again, full, atol=1e-5)


def test_single_int_and_zero_state(v6_model):
    a, _ = v6_model.forward(5, None)
    b, _ = v6_model.forward([5], v6_model.generate_zero_state())
    assert a.shape == (97,) and torch.allclose(a, b)
    assert v6_model.args.n_layer == 2 and v6_model.args.vocab_size == 97 and v6_model.version == 6


def test_bad_inputs_are_clear_errors(v6_model, tmp_path):
    with pytest.raises(ConfigError, match="list of 6 tensors"):
        v6_model.forward([1], [torch.zeros(64)] * 5)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        v6_model.forward([97], None)  # one token takes the traced path, which has no checks of its own
    with pytest.raises(CheckpointError, match="not found"):
        RWKV(model=str(tmp_path / "missing"), strategy="cpu fp32")
    with pytest.raises(ConfigError, match="quantization"):
        RWKV(model=str(tmp_path / "missing"), strategy="cpu fp32i4")


class ListTokenizer:
    """Token i <-> character chr(ord('a') + i % 26): enough to drive PIPELINE without a vocabulary file."""

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_pipeline_generate_streams_bans_and_stops(v6_model):
    pipe = PIPELINE.__new__(PIPELINE)
    pipe.model, pipe.tokenizer = v6_model, ListTokenizer()
    pieces = []
    args = PIPELINE_ARGS(temperature=1.0, top_p=0.9, token_ban=list(range(10, 97)), chunk_len=3)
    torch.manual_seed(0)
    text = pipe.generate("abcdefg", token_count=12, args=args, callback=pieces.append)
    assert text == "".join(pieces) and len(text) == 12
    assert set(text) <= set("abcdefghij")  # ids >= 10 are banned
    first = int(v6_model.forward(pipe.encode("abc"), None)[0].argmax())  # temperature 0 is greedy
    stop = PIPELINE_ARGS(temperature=0, token_stop=[first])
    assert pipe.generate("abc", token_count=5, args=stop) == ""
    assert pipe.refine_context("  hello \n\n\u3000world\r\n ") == "\nhello\nworld"


def test_bf16_strategy_runs_and_stays_close_to_fp32(v6_model):
    bf16 = RWKV(model=v6_model.args.MODEL_NAME, strategy="cpu bf16", verbose=False)
    ref, ref_state = v6_model.forward(PROMPT, None)
    out, state = bf16.forward(PROMPT, None)
    ref, _ = v6_model.forward(STEPS[:1], ref_state)
    out, state = bf16.forward(STEPS[:1], state)
    assert out.dtype == torch.float32 and state[0].dtype == torch.bfloat16 and state[1].dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
