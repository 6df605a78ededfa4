"""Drop-in replacement for the official `rwkv` pip package: `from rwkvkit.compat import RWKV, PIPELINE, PIPELINE_ARGS`.

ChatRWKV-style scripts switch by changing that one import. What is the same as the official package:

- `RWKV(model=path, strategy="cpu fp32")`: the path may omit `.pth`; the official strategy grammar is parsed and
  anything rwkvkit does not run (int8, splitting over devices/dtypes, streaming) is refused with a ConfigError.
  Every version (4, 5.2, 6, 7) loads in the same process, with no environment variables.
- `forward(tokens, state, full_output=False) -> (logits, state)`: `tokens` a list of ids (or one int), `state` None or
  the official flat list of tensors (v4: 5 per layer `att_x, aa, bb, pp, ffn_x`; v5.2/v6/v7: 3 per layer
  `att_x, wkv, ffn_x`, wkv [H, N, N] key-major for v5/v6 and value-major for v7). Like the official package it fills
  the given list with the new tensors (and returns it); the tensors it held are not modified, so a `copy.deepcopy`
  (or a shallow list copy) keeps an old state. Logits are float32: the last token's [V], or [T, V] with
  `full_output=True` and several tokens.
- `PIPELINE(model, "rwkv_vocab_v20230424" | "<path>/20B_tokenizer.json" | "cl100k_base")` with encode, decode,
  refine_context, sample_logits and generate, and `PIPELINE_ARGS` with the official fields and defaults.

Differences: logits are float32 for v7 too (the official v7 returns the model dtype); `top_p=1.0` really keeps every
token (the official CPU sampler falls back to greedy there, see rwkvkit.runtime.sampling); the sequence path of every
version is the chunked GPT mode rather than a token-by-token loop.
"""

from __future__ import annotations

import operator
import types
from pathlib import Path

import numpy as np
import torch

from rwkvkit.errors import CheckpointError, ConfigError, TokenizerError
from rwkvkit.runtime.generation import DecodeStep, last_logits, use_gemv_friendly_layout
from rwkvkit.runtime.sampling import Penalties, ban_tokens, filtered_probs, penalty_weight
from rwkvkit.runtime.strategy import parse_strategy

__all__ = ["RWKV", "PIPELINE", "PIPELINE_ARGS"]


def _checkpoint_path(model: str) -> Path:
    path = Path(str(model).strip())
    if path.exists():
        return path
    with_ext = path.with_name(path.name + ".pth")
    if with_ext.exists():
        return with_ext
    raise CheckpointError(f"checkpoint not found: {path} (nor {with_ext})")


class RWKV:
    """An rwkvkit model behind the official `rwkv.model.RWKV` interface."""

    def __init__(self, model: str, strategy: str = "cpu fp32", verbose: bool = True, convert_and_save_and_exit=None):
        if convert_and_save_and_exit is not None:
            raise ConfigError(
                "convert_and_save_and_exit (the official strategy-specific converted format) is not supported; "
                "use `rwkvkit convert` to change formats or dtypes"
            )
        import rwkvkit

        self.strategy = parse_strategy(strategy)
        path = _checkpoint_path(model)
        # PIPELINE brings its own tokenizer, as officially
        self.model = rwkvkit.load(path, device=self.strategy.device, dtype=self.strategy.torch_dtype, tokenizer=None,
                                  int8=self.strategy.quant == "i8")
        use_gemv_friendly_layout(self.model)  # the model is ours alone, and only ever runs inference
        self._decode = DecodeStep(self.model)
        cfg = self.model.config
        self.version = {"4": 4, "5.2": 5.2, "6": 6, "7": 7}[cfg.version]
        self._per_layer = 5 if cfg.version == "4" else 3
        self.n_layer, self.n_embd = cfg.n_layer, cfg.n_embd
        self.n_head, self.head_size = (cfg.n_head, cfg.head_size) if cfg.version != "4" else (0, 0)
        self.args = types.SimpleNamespace(
            MODEL_NAME=str(path),
            strategy_string=self.strategy.text,
            n_layer=cfg.n_layer,
            n_embd=cfg.n_embd,
            n_att=cfg.dim_att,
            n_ffn=cfg.dim_ffn,
            vocab_size=cfg.vocab_size,
            n_head=self.n_head,
            head_size=self.head_size,
        )
        if verbose:
            print(f"rwkvkit.compat: loaded RWKV-{cfg.version} L{cfg.n_layer} D{cfg.n_embd} from {path} ({strategy})")

    # ------------------------------------------------------------ official flat state <-> rwkvkit State

    def generate_zero_state(self) -> list[torch.Tensor]:
        return self._flat(self.model.zero_state(1), [None] * (self.n_layer * self._per_layer))

    def _flat(self, state, out: list) -> list:
        """Write the rows of a batch-1 State into the official flat list `out` (replacing its entries)."""
        K = self._per_layer
        for i in range(self.n_layer):
            out[i * K] = state.att_x[i, 0]
            if K == 5:
                out[i * K + 1], out[i * K + 2], out[i * K + 3] = state.wkv[i, 0].unbind(0)
            else:
                out[i * K + 1] = state.wkv[i, 0]
            out[i * K + K - 1] = state.ffn_x[i, 0]
        return out

    def _state(self, flat: list):
        from rwkvkit.models import State

        K, L = self._per_layer, self.n_layer
        if not isinstance(flat, (list, tuple)) or len(flat) != L * K:
            got = f"{len(flat)} tensors" if isinstance(flat, (list, tuple)) else type(flat).__name__
            raise ConfigError(f"state must be None or a list of {L * K} tensors ({K} per layer), got {got}")
        w = self.model.emb.weight
        try:
            att_x = torch.stack([flat[i * K] for i in range(L)])
            ffn_x = torch.stack([flat[i * K + K - 1] for i in range(L)])
            if K == 5:
                wkv = torch.stack([torch.stack(flat[i * K + 1 : i * K + 4]) for i in range(L)])
            else:
                wkv = torch.stack([flat[i * K + 1] for i in range(L)])
        except (TypeError, RuntimeError) as e:
            raise ConfigError(f"state tensors do not fit this model: {str(e).splitlines()[0]}") from None
        return State(
            att_x.unsqueeze(1).to(w.device, w.dtype),
            wkv.unsqueeze(1).to(w.device, torch.float32),
            ffn_x.unsqueeze(1).to(w.device, w.dtype),
            self.model.config.version,
        )

    # ------------------------------------------------------------ running

    @torch.no_grad()
    def forward(self, tokens, state, full_output: bool = False):
        ids = [operator.index(tokens)] if not isinstance(tokens, (list, tuple)) else [operator.index(t) for t in tokens]
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad or not ids:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})" if bad else "no tokens")
        ours = self.model.zero_state(1) if state is None else self._state(state)
        idx = torch.tensor([ids], dtype=torch.long, device=self.model.emb.weight.device)
        if len(ids) == 1:
            logits, new_state = self._decode(idx, ours)
        elif full_output:
            logits, new_state = self.model(idx, ours)
        else:
            logits, new_state = last_logits(self.model, idx, ours)
        if state is None:
            state = [None] * (self.n_layer * self._per_layer)
        self._flat(new_state, state)
        return logits[0].float(), state

    __call__ = forward


class PIPELINE_ARGS:
    """Sampling settings of `PIPELINE.generate`, with the official names and defaults."""

    def __init__(
        self,
        temperature=1.0,
        top_p=0.85,
        top_k=0,
        alpha_frequency=0.2,
        alpha_presence=0.2,
        alpha_decay=0.996,
        token_ban=(),
        token_stop=(),
        chunk_len=256,
    ):
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.alpha_frequency = alpha_frequency
        self.alpha_presence = alpha_presence
        self.alpha_decay = alpha_decay
        self.token_ban = list(token_ban)
        self.token_stop = list(token_stop)
        self.chunk_len = chunk_len


def _pipeline_tokenizer(word_name: str):
    from rwkvkit.tokenizer import get_tokenizer

    if word_name == "rwkv_vocab_v20230424":
        return get_tokenizer("world")
    if word_name == "cl100k_base":
        try:
            import tiktoken
        except ImportError:
            raise TokenizerError("the 'cl100k_base' tokenizer needs tiktoken (pip install tiktoken)") from None
        return tiktoken.get_encoding(word_name)
    path = Path(word_name)
    if path.is_file():
        return get_tokenizer(str(path))
    if path.name == "20B_tokenizer.json":  # the official package does not ship it; rwkvkit does
        return get_tokenizer("neox")
    raise TokenizerError(f"tokenizer not found: {word_name!r} (expected 'rwkv_vocab_v20230424' or a tokenizer file)")


class PIPELINE:
    """Tokenizer + sampler + generation loop with the official `rwkv.utils.PIPELINE` behaviour."""

    def __init__(self, model, WORD_NAME: str):
        self.model = model
        self.tokenizer = _pipeline_tokenizer(WORD_NAME)

    def refine_context(self, context: str) -> str:
        """Strip every line (and full-width spaces, CR), drop empty lines, and start with a newline."""
        lines = [line.strip().strip("\u3000").strip("\r") for line in context.strip().split("\n")]
        return "\n" + "\n".join(line for line in lines if line).strip()

    def encode(self, x: str) -> list[int]:
        return list(self.tokenizer.encode(x))

    def decode(self, x) -> str:
        return self.tokenizer.decode(list(x))

    def sample_logits(self, logits, temperature=1.0, top_p=0.85, top_k=0) -> int:
        """One token from `logits` [V] by the official rule; CPU draws come from numpy's global RNG, as officially."""
        probs = filtered_probs(logits, temperature, top_p, int(top_k))
        if probs.device.type == "cpu":
            p = probs.numpy().astype(np.float64)
            return int(np.random.choice(len(p), p=p / p.sum()))
        return int(torch.multinomial(probs, 1)[0])

    def generate(self, ctx: str, token_count: int = 100, args: PIPELINE_ARGS | None = None, callback=None, state=None):
        """Sample `token_count` tokens after `ctx`; `callback(text)` gets each complete piece of text.

        Like the official loop: the prompt is fed in `args.chunk_len` pieces; the state list you pass is updated in
        place but not returned; a token in `token_stop` ends generation without being emitted.
        """
        args = args or PIPELINE_ARGS()
        all_tokens: list[int] = []
        out_last, out_str = 0, ""
        penalties = None
        token = None
        for i in range(token_count):
            tokens = self.encode(ctx) if i == 0 else [token]
            while tokens:
                out, state = self.model.forward(tokens[: args.chunk_len], state)
                tokens = tokens[args.chunk_len :]
            if penalties is None:
                penalties = Penalties(
                    out.shape[-1], args.alpha_presence, args.alpha_frequency, args.alpha_decay, device=out.device
                )
            out = penalties.apply(ban_tokens(out, args.token_ban))
            token = self.sample_logits(out, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
            if token in args.token_stop:
                break
            all_tokens.append(token)
            penalties.update(token, penalty_weight(self.decode([token])))
            text = self.decode(all_tokens[out_last:])
            if "\ufffd" not in text:  # hold back until the UTF-8 character is complete
                if callback:
                    callback(text)
                out_str += text
                out_last = i + 1
        return out_str
