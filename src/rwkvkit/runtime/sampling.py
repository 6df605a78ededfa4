"""Token sampling: temperature, top-p, top-k, presence/frequency penalties with decay, bans.

The filtering rule is the one of the official `rwkv` package (`PIPELINE.sample_logits`), so that the compat layer and
the native runtime sample from the same distribution:

1. temperature == 0 means greedy (top-p 0: every token tied with the most likely one is kept);
2. softmax in float32;
3. top-p: the cutoff is the first probability (in descending order) at which the running sum reaches `top_p`;
   every probability below the cutoff is dropped (ties with the cutoff are kept);
4. top-k keeps the `top_k` most likely tokens (0 = off);
5. temperature is applied AFTER truncation, as `probs ** (1 / temperature)`, then renormalised.

One deliberate deviation: when the running sum never reaches `top_p` (float32 sums of 65536 probabilities end a hair
below 1.0, so `top_p=1.0` always hits this), the official code silently falls back to greedy; here every token is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rwkvkit.errors import ConfigError

# The official penalty bookkeeping lets these texts repeat for free (spaces, tabs and digit runs like "12").
PENALTY_FREE_TEXT = " \t0123456789"


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 1.0
    banned_tokens: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ConfigError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.penalty_decay <= 1:
            raise ConfigError(f"penalty_decay must be in [0, 1], got {self.penalty_decay}")
        self.banned_tokens = tuple(int(t) for t in self.banned_tokens)


def filtered_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0) -> torch.Tensor:
    """Normalised float32 sampling distribution over the last dim of `logits` (the official rule, see module doc)."""
    if temperature == 0:
        temperature, top_p = 1.0, 0.0
    probs = torch.softmax(logits.float(), dim=-1)
    vocab = probs.shape[-1]
    keep = None
    if top_p < 1:
        keep = probs >= top_p_cutoff(probs, top_p)
    if 0 < top_k < vocab:
        in_top_k = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, probs.topk(top_k, dim=-1).indices, True)
        keep = in_top_k if keep is None else keep & in_top_k
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0)
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return probs / probs.sum(dim=-1, keepdim=True)


def top_p_cutoff(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[..., 1]: the first probability, in descending order, at which the running sum reaches `top_p`.

    Sorting a 65536-entry vocabulary for every token costs more than a small model's decode step, while the
    nucleus is usually a few dozen tokens: look at the top 256 first and widen only when the sum falls short.
    If it never reaches `top_p`, the smallest probability (keep everything).
    """
    vocab = probs.shape[-1]
    k = min(vocab, 256)
    while True:
        top = probs.topk(k, dim=-1).values  # sorted descending, so its running sum is a prefix of the full one
        reached = torch.cumsum(top, dim=-1) >= top_p
        found = reached.any(dim=-1)
        if k == vocab or bool(found.all()):
            break
        k = min(vocab, k * 16)
    first = torch.where(found, reached.int().argmax(dim=-1), k - 1)
    return top.gather(-1, first.unsqueeze(-1))


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from normalised probabilities ([V] -> scalar tensor, [B, V] -> [B])."""
    if probs.dim() == 1:
        return torch.multinomial(probs, 1, generator=generator)[0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def ban_tokens(logits: torch.Tensor, banned) -> torch.Tensor:
    """A copy of `logits` with the banned ids at -inf (they can never be sampled)."""
    banned = list(banned)
    if not banned:
        return logits
    logits = logits.clone()
    logits[..., banned] = float("-inf")
    return logits


def penalty_weight(text: str) -> float:
    """How much one occurrence of a token with this decoded text counts for the frequency penalty (official rule)."""
    return 0.0 if text in PENALTY_FREE_TEXT else 1.0


class Penalties:
    """Presence and frequency penalties with decay, over a whole vocabulary.

    A token seen at least once loses `presence` (even when its weight is 0), plus `frequency` times its decayed count.
    `update(token)` first decays every count by `decay`, then adds the token's weight: the official order.
    """

    def __init__(self, vocab_size: int, presence: float = 0.0, frequency: float = 0.0, decay: float = 1.0, device=None):
        self.presence, self.frequency, self.decay = presence, frequency, decay
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    @property
    def active(self) -> bool:
        return self.presence != 0 or self.frequency != 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        penalty = self.seen.float() * self.presence + self.counts * self.frequency
        return logits - penalty.to(logits.device, logits.dtype)

    def update(self, token: int, weight: float = 1.0) -> None:
        self.counts.mul_(self.decay)
        self.seen[token] = True
        self.counts[token] += weight


class Sampler:
    """Stateful sampler for one sequence: bans, penalties, filtering and a seedable RNG.

    `sampler(logits [V]) -> int`; call `sampler.accept(token, text)` for every token that is kept, so the penalties
    see it (`text` is its decoded form, used for the official penalty-free set; None counts as a normal token).
    """

    def __init__(self, params: SamplingParams, vocab_size: int, seed: int | None = None, device="cpu"):
        self.params = params
        self.penalties = Penalties(
            vocab_size, params.presence_penalty, params.frequency_penalty, params.penalty_decay, device=device
        )
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.params
        logits = self.penalties.apply(ban_tokens(logits.float(), p.banned_tokens))
        probs = filtered_probs(logits, p.temperature, p.top_p, p.top_k)
        return int(sample(probs, self.generator))

    def accept(self, token: int, text: str | None = None) -> None:
        self.penalties.update(token, 1.0 if text is None else penalty_weight(text))
