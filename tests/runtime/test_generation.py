import pytest
import torch
from torch import nn

from rwkvkit.errors import ConfigError
from rwkvkit.runtime.generation import StopFilter, generate_tokens
from rwkvkit.runtime.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
E_ACUTE = "é".encode()
VOCAB = {0: b"", 1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\n", 6: b"!", 7: E_ACUTE[:1], 8: E_ACUTE[1:]}


class DecodeOnlyTokenizer:
    """A tokenizer without a streaming decoder: the stream falls back to re-decoding (the official rule)."""

    def decode(self, ids):
        return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


class BytesTokenizer(DecodeOnlyTokenizer):
    """With the rwkvkit tokenizers' streaming decoder."""

    def stream(self):
        from rwkvkit.tokenizer import StreamDecoder

        return StreamDecoder(self)

    def decode_bytes(self, ids):
        return b"".join(VOCAB[i] for i in ([ids] if isinstance(ids, int) else ids))


class ScriptedModel(nn.Module):
    """Predicts `script[i]` after the prompt and i generated tokens; the state is the number of tokens consumed.
    Its hidden states are already the logits (the head is the identity)."""

    def __init__(self, script, prompt_len=1, vocab=len(VOCAB)):
        super().__init__()
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab
        self.head = nn.Identity()
        self.dummy = nn.Parameter(torch.zeros(1))

    def hidden(self, idx, state=None):
        consumed = (0 if state is None else int(state)) + idx.shape[1]
        logits = torch.zeros(1, idx.shape[1], self.vocab)
        logits[0, -1, self.script[min(consumed - self.prompt_len, len(self.script) - 1)]] = 100.0
        return logits, torch.tensor(consumed)


def run(script, tokenizer=BytesTokenizer(), **kwargs):
    kwargs.setdefault("max_tokens", 50)
    chunks = list(generate_tokens(ScriptedModel(script), [1], sampling=GREEDY, tokenizer=tokenizer, **kwargs))
    return chunks, "".join(c.text for c in chunks), [t for c in chunks for t in c.tokens]


@pytest.mark.parametrize("tokenizer", [BytesTokenizer(), DecodeOnlyTokenizer()])
def test_stream_holds_incomplete_utf8_until_the_character_is_complete(tokenizer):
    chunks, text, tokens = run([2, 7, 8, 6], tokenizer=tokenizer, max_tokens=4)
    assert [c.text for c in chunks] == ["lo", "", "é", "!"]
    assert text == "loé!" and tokens == [2, 7, 8, 6]
    assert chunks[-1].finish_reason == "length"


def test_stop_string_is_never_printed_even_partially():
    chunks, text, tokens = run([2, 3, 4, 6], stop_strings=["world"])
    assert text == "lo "
    assert all("w" not in c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop_string" and tokens == [2, 3, 4]


def test_held_back_text_is_released_when_the_stop_string_does_not_complete():
    chunks, text, _ = run([5, 6, 5, 5], stop_strings=["\n\n"])
    assert text == "\n!"  # "\n" waits until "!" shows it is not "\n\n"
    assert [c.text for c in chunks[:2]] == ["", "\n!"]
    assert chunks[-1].finish_reason == "stop_string"


def test_held_back_text_is_flushed_at_the_length_limit():
    chunks, text, _ = run([2, 5], stop_strings=["\n\n"], max_tokens=2)
    assert text == "lo\n" and chunks[-1].finish_reason == "length"


def test_stop_token_ends_generation_without_being_emitted():
    _, _, tokens = run([2, 6, 0, 6], max_tokens=4)
    assert tokens == [2, 6, 0, 6]  # 0 is an ordinary token unless asked for
    chunks, text, tokens = run([2, 6, 0, 6], stop_tokens=[0])
    assert tokens == [2, 6] and text == "lo!"
    assert chunks[-1].finish_reason == "stop_token" and chunks[-1].tokens == []


def test_without_tokenizer_tokens_stream_and_stop_tokens_apply():
    chunks = list(generate_tokens(ScriptedModel([2, 6, 3]), [1], sampling=GREEDY, max_tokens=3, stop_tokens=[3]))
    assert [c.tokens for c in chunks] == [[2], [6], []] and chunks[-1].finish_reason == "stop_token"
    assert chunks[-1].state == 3  # prompt + two accepted tokens; the stop token is not fed


def test_stop_filter_handles_overlapping_candidates():
    f = StopFilter(["abc", "bd"])
    assert f.push("xab") == ("x", False)
    assert f.push("d") == ("a", True)  # "abd" contains "bd": "a" is emitted, "bd" is not


def test_invalid_requests_are_config_errors():
    model = ScriptedModel([2])
    with pytest.raises(ConfigError):
        list(generate_tokens(model, [], max_tokens=1))
    with pytest.raises(ConfigError):
        list(generate_tokens(model, [1], max_tokens=1, stop_strings=["x"]))


def test_real_model_final_state_equals_running_the_whole_text(official_checkpoint):
    import rwkvkit

    model = rwkvkit.load(official_checkpoint("7"), tokenizer=None)
    prompt = [5, 17, 3, 42]
    start = model(prompt[:2])[1]
    before = start.clone()
    params = SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.3, frequency_penalty=0.3)
    runs = [list(generate_tokens(model, prompt[2:], start, max_tokens=6, sampling=params, seed=7)) for _ in range(2)]
    tokens = [[t for c in chunks for t in c.tokens] for chunks in runs]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 6
    assert torch.equal(start.wkv, before.wkv)  # the caller's state is untouched
    _, expected = model(prompt + tokens[0])
    final = runs[0][-1].state
    assert torch.allclose(final.wkv, expected.wkv, atol=1e-5)
    assert torch.allclose(final.att_x, expected.att_x, atol=1e-5)


@pytest.mark.parametrize("version", ["4", "7"])
def test_traced_decode_step_equals_the_eager_model(version, official_checkpoint):
    import rwkvkit
    from rwkvkit.runtime.generation import DecodeStep, last_logits

    model = rwkvkit.load(official_checkpoint(version), tokenizer=None)
    step = DecodeStep(model)
    with torch.no_grad():
        _, state = model([3, 1, 4, 1, 5])
        eager_state = traced_state = state
        for token in [9, 2, 6, 5]:  # the first call records the trace, later ones replay it
            idx = torch.tensor([[token]])
            eager, eager_state = last_logits(model, idx, eager_state)
            traced, traced_state = step(idx, traced_state)
            assert torch.allclose(traced, eager, atol=1e-5)
    assert torch.allclose(traced_state.wkv, eager_state.wkv, atol=1e-5)
    assert step._traces  # the step really ran traced


def test_gemv_friendly_layout_keeps_values_shapes_and_outputs(official_checkpoint):
    import rwkvkit
    from rwkvkit.runtime.generation import use_gemv_friendly_layout

    model = rwkvkit.load(official_checkpoint("6"), tokenizer=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref, _ = model([3, 1, 4, 1, 5])
    use_gemv_friendly_layout(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.head.weight.t().is_contiguous() and not model.head.weight.is_contiguous()
    out, _ = model([3, 1, 4, 1, 5])
    assert torch.allclose(out, ref, atol=1e-5)


def test_bf16_weights_decode_traced_and_close_to_fp32(official_checkpoint):
    import rwkvkit
    from rwkvkit.runtime.generation import DecodeStep, last_logits, use_gemv_friendly_layout

    path = official_checkpoint("7")
    ref_model = rwkvkit.load(path, dtype=torch.float32, tokenizer=None)
    model = rwkvkit.load(path, dtype=torch.bfloat16, tokenizer=None)
    use_gemv_friendly_layout(model)
    assert model.head.weight.is_contiguous()  # bf16 GEMVs are faster in nn.Linear's own [out, in] layout
    step = DecodeStep(model)
    with torch.no_grad():
        ref, ref_state = last_logits(ref_model, torch.tensor([[3, 1, 4, 1, 5]]))
        out, state = last_logits(model, torch.tensor([[3, 1, 4, 1, 5]]))
        assert state.wkv.dtype == torch.float32
        eager_state = state
        for token in [9, 2, 6, 5]:
            idx = torch.tensor([[token]])
            eager, eager_state = last_logits(model, idx, eager_state)
            out, state = step(idx, state)
            ref, ref_state = last_logits(ref_model, idx, ref_state)
            assert torch.allclose(out.float(), eager.float(), atol=1e-2)
            assert torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max().item())
    assert step._traces


def test_gemv_friendly_layout_decode_matches_the_plain_model(official_checkpoint):
    import rwkvkit
    from rwkvkit.runtime.generation import DecodeStep, last_logits, use_gemv_friendly_layout

    path = official_checkpoint("7", vocab=96)  # even, so the head is split too
    plain = rwkvkit.load(path, tokenizer=None)
    model = rwkvkit.load(path, tokenizer=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the split products are used with several threads
    try:
        use_gemv_friendly_layout(model)
    finally:
        torch.set_num_threads(threads)
    assert type(model.blocks[0].att.key).__name__ == type(model.head).__name__ == "_SplitGemvLinear"
    assert model.state_dict().keys() == plain.state_dict().keys()
    step = DecodeStep(model)
    with torch.no_grad():
        ref, ref_state = last_logits(plain, torch.tensor([[3, 1, 4, 1, 5]]))
        out, state = last_logits(model, torch.tensor([[3, 1, 4, 1, 5]]))
        assert torch.allclose(out, ref, atol=1e-5)
        for token in [9, 2, 6, 5]:
            idx = torch.tensor([[token]])
            ref, ref_state = last_logits(plain, idx, ref_state)
            out, state = step(idx, state)
            assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(state.wkv, ref_state.wkv, atol=1e-5)
