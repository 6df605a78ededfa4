"""Streaming generation: prefill the prompt in one GPT-mode call, then sample one token per RNN step.

`generate_tokens` is a generator of `Chunk`s. Text is streamed through a decoder that holds back incomplete UTF-8
characters, and through a stop-string filter that holds back any tail that could still become a stop string, so a
stop string never appears (not even partially) in the streamed text.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from rwkvkit.errors import ConfigError
from rwkvkit.runtime.sampling import Sampler, SamplingParams


@dataclass
class Chunk:
    """One step of a generation.

    tokens: the sampled tokens accepted in this step (fed to the state, counted by the penalties);
    text: the text that is now safe to print (may be "" while a character or a possible stop string is pending).
    The last chunk has `finish_reason` ("length", "stop_token" or "stop_string") and `state`: the model state after
    the prompt and every accepted token (a stop token is not accepted, so not in the state).
    """

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    state: object = None


class TextStream:
    """Token ids in, printable text out: incomplete multi-byte characters wait for their next bytes.

    Uses the tokenizer's streaming decoder (`tokenizer.stream()`) when it has one, else re-decodes the pending ids
    with `decode` and waits while the result contains U+FFFD (the official package's rule).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._stream = tokenizer.stream() if hasattr(tokenizer, "stream") else None
        self._pending: list[int] = []

    def push(self, token: int) -> str:
        if self._stream is not None:
            return self._stream.push(token)
        self._pending.append(token)
        text = self.tokenizer.decode(self._pending)
        if "\ufffd" in text:
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        """Whatever is still pending at the end (broken bytes become U+FFFD)."""
        if self._stream is not None:
            return self._stream.flush()
        text = self.tokenizer.decode(self._pending) if self._pending else ""
        self._pending = []
        return text


class StopFilter:
    """Streams text until one of the stop strings appears; the stop string itself is never emitted."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stops = [s for s in stop_strings if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was found)."""
        held = self._held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return held[: min(hits)], True
        keep = self._longest_stop_prefix_suffix(held)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is the beginning of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


def last_logits(model, idx: torch.Tensor, state=None):
    """Logits of the last position only ([B, V]) and the new state, for idx [B, T].

    A prefill needs only the last position's logits: skipping the head on the others saves 2 * T * C * V flops
    (for a 0.1B World model, more than all the layers together).
    """
    hidden, state = model.hidden(idx, state)
    return model.head(hidden[:, -1]), state


@torch.no_grad()
def use_gemv_friendly_layout(model) -> None:
    """Store every fp32 CPU nn.Linear weight as the transpose of a contiguous [in, out] tensor: same values, shape.

    A one-token step is one matrix-vector product per weight, bound by memory bandwidth, and on CPU an fp32 product
    reads an [in, out] matrix much faster than nn.Linear's [out, in] (measured 26 vs 16 GB/s on 2 EPYC cores, the
    difference between at most 46 and 28 tokens/s for a 0.1B model; the official package stores its weights this
    way). bf16 is the other way round (oneDNN: 19 GB/s [out, in] vs 11 GB/s [in, out]), so other dtypes are left
    as they are. Prefill GEMMs run at the same speed either way. With several threads the fp32 modules also become
    `_SplitGemvLinear`s. Meant for models used for inference: it replaces the parameters' storage (so views taken
    earlier no longer alias them).
    """
    for module in model.modules():
        if (
            type(module) is torch.nn.Linear
            and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32
        ):
            module.weight.data = module.weight.data.t().contiguous().t()
            if torch.get_num_threads() > 1 and module.out_features % 2 == 0:
                module.__class__ = _SplitGemvLinear  # same parameters, state dict and outputs


class _SplitGemvLinear(torch.nn.Linear):
    """An nn.Linear (weight stored [in, out]) whose one-row products run as two half-width products in one bmm.

    A plain CPU matrix-vector product streams its matrix on one thread (on 2 EPYC cores: 20 GB/s from memory for
    a layer's matrix, the same with 1 thread; 26 GB/s for a World head); a bmm over the two column halves of the
    [in, out] matrix (strided views, no copy) streams them on two threads: 28-31 and 37 GB/s. Each output is the
    same dot product as before (equal up to rounding). Rows > 1 (prefill) take nn.Linear's path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1:
            return super().forward(x)
        half = self.out_features // 2
        halves = self.weight.t().view(self.in_features, 2, half).transpose(0, 1)  # [2, in, out/2]
        y = torch.bmm(x.reshape(1, 1, -1).expand(2, 1, -1), halves)
        return y.reshape(*x.shape[:-1], self.out_features)


class DecodeStep:
    """`step(idx [B, 1], state) -> (logits [B, V], new_state)`: one RNN-mode token, as fast as the device allows.

    On CPU a decode step is hundreds of small ops, each paying Python and nn.Module overhead (about 3 ms per token
    for 12 layers: 6% of a 0.1B model's step, half of a tiny model's). With `trace=True` the step runs as a
    TorchScript trace of the model's own `hidden` + head: the ops recorded from the model code (still the single
    source of truth) and replayed without Python. Recording costs about 0.25 s once, which a 0.1B model earns back
    in roughly 100 tokens. The trace shares the model's parameters; one is recorded per batch size and dtype. The
    caller validates the token ids (the trace has no checks). CUDA and non-RWKVModel models always run eagerly.
    """

    def __init__(self, model, trace: bool = True):
        from rwkvkit.models import RWKVModel

        self.model = model
        self._traces: dict = {}
        self._trace = trace and isinstance(model, RWKVModel) and model.emb.weight.device.type == "cpu"

    def __call__(self, idx: torch.Tensor, state):
        if not self._trace or state is None or torch.is_grad_enabled():
            return last_logits(self.model, idx, state)
        key = (idx.shape[0], self.model.emb.weight.dtype, state.att_x.dtype)
        trace = self._traces.get(key)
        if trace is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings: the input checks become constants, as intended
                trace = torch.jit.trace(
                    _TracedStep(self.model), (idx, state.att_x, state.wkv, state.ffn_x), check_trace=False
                )
            self._traces[key] = trace
        # The JIT's optimising passes cost a few hundred ms on the first calls and gain nothing measurable here.
        with torch.jit.optimized_execution(False):
            logits, att_x, wkv, ffn_x = trace(idx, state.att_x, state.wkv, state.ffn_x)
        return logits, type(state)(att_x, wkv, ffn_x, state.version)


class _TracedStep(torch.nn.Module):
    """The tensors-in, tensors-out form of a step that torch.jit.trace needs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, att_x, wkv, ffn_x):
        from rwkvkit.models import State

        logits, state = last_logits(self.model, idx, State(att_x, wkv, ffn_x, self.model.config.version))
        return logits, state.att_x, state.wkv, state.ffn_x


@torch.no_grad()
def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    state=None,
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop_tokens: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    seed: int | None = None,
    prefill_chunk: int | None = None,
) -> Iterator[Chunk]:
    """Sample up to `max_tokens` tokens after `prompt_ids` (continuing from `state` if given, which is not modified).

    The model is an rwkvkit model (`model.hidden(idx [B, T], state) -> (hidden, new_state)` and `model.head`). The
    prompt is prefilled in one call, computing only the last position's logits (or in pieces of
    `prefill_chunk` tokens to bound memory). With a `tokenizer`, chunks carry streamed text; stop strings need one.
    """
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ConfigError("generation needs at least one prompt token")
    if max_tokens < 0:
        raise ConfigError(f"max_tokens must be >= 0, got {max_tokens}")
    if stop_strings and tokenizer is None:
        raise ConfigError("stop strings need a tokenizer")
    sampling = sampling or SamplingParams()
    device = next(model.parameters()).device
    stop_tokens = set(int(t) for t in stop_tokens)

    step = prefill_chunk or len(prompt_ids)
    for start in range(0, len(prompt_ids), step):
        idx = torch.tensor([prompt_ids[start : start + step]], dtype=torch.long, device=device)
        logits, state = last_logits(model, idx, state)
    decode, current_state = _decode_step(model, state, max_tokens)
    logits = logits[0]

    sampler = Sampler(sampling, logits.shape[-1], seed=seed, device=logits.device)
    text_stream = TextStream(tokenizer) if tokenizer is not None else None
    stop_filter = StopFilter(stop_strings)
    for produced in range(max_tokens):
        token = sampler(logits)
        if token in stop_tokens:
            yield Chunk([], _flush(text_stream, stop_filter), "stop_token", current_state(state))
            return
        piece = text_stream.push(token) if text_stream else ""
        sampler.accept(token, tokenizer.decode([token]) if tokenizer is not None and sampler.penalties.active else None)
        logits, state = decode(torch.tensor([[token]], device=device), state)
        logits = logits[0]
        text, stopped = stop_filter.push(piece)
        if stopped:
            yield Chunk([token], text, "stop_string", current_state(state))
            return
        if produced == max_tokens - 1:
            yield Chunk([token], text + _flush(text_stream, stop_filter), "length", current_state(state))
            return
        yield Chunk([token], text)
    yield Chunk([], "", "length", current_state(state))


# capturing the graph costs about four eager steps; below this many tokens the eager loop is as quick
_GRAPH_MIN_TOKENS = 8


def _decode_step(model, state, max_tokens: int):
    """(step, current_state): the one-token step for the sampling loop, and how to read the state after it.

    On CUDA (from a few tokens on): a `Decoder` replaying a CUDA graph, of the fused Triton step for RWKV-7
    (logits within the dtype's rounding of eager) and of the model's own step for v4-v6 (the same kernels as eager,
    so the same logits); torch.compile is left off: its start-up takes longer than most generations. Its state
    lives in the decoder's buffers and is copied out only when a final chunk needs it. Elsewhere `DecodeStep`,
    tracing only where it pays off (over many tokens)."""
    from rwkvkit.models import RWKVModel

    if isinstance(model, RWKVModel) and model.emb.weight.device.type == "cuda" and max_tokens >= _GRAPH_MIN_TOKENS:
        from rwkvkit.runtime.decode import Decoder

        decoder = Decoder(model, batch_size=1, cuda_graph=True, compile=False)
        decoder.load_state(state)

        def step(idx, _state):
            return decoder.step(idx.view(1)), None

        return step, lambda _state: decoder.state
    return DecodeStep(model, trace=max_tokens >= 100), lambda s: s


def _flush(text_stream: TextStream | None, stop_filter: StopFilter) -> str:
    if text_stream is None:
        return stop_filter.flush()
    text, stopped = stop_filter.push(text_stream.flush())
    return text if stopped else text + stop_filter.flush()
