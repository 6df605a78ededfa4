"""RWKV-LM's pretraining order: magic_prime and the cube-permutation window sampler.

For a prime p with p % 3 == 2, x -> x^3 is a bijection of Z_p (gcd(3, p - 1) == 1), and so is x -> factor * x^3
for a factor coprime with p. RWKV-LM uses it to visit the p ctx_len-aligned chunks of the flat token stream in a
fixed pseudo-random order: sample number ii (1, 2, 3, ...) reads the window starting at token
`((factor * ii^3) mod p) * ctx_len`. All arithmetic here is on Python ints, so it is exact at any scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rwkvkit.errors import ConfigError, DataError

SAMPLES_PER_EPOCH = 40320  # RWKV-LM's "mini-epoch": 40320 = 8! samples, so most batch sizes divide it
_GOLDEN = (math.sqrt(5) - 1) / 2


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (these bases are exact far beyond any token count)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for q in bases:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(n_tokens: int, ctx_len: int) -> int:
    """The largest prime p with p % 3 == 2 and p <= n_tokens // ctx_len - 1 (RWKV-LM's make_data.py rule)."""
    if n_tokens < 3 * ctx_len:
        raise DataError(
            f"{n_tokens} tokens are too few for ctx_len {ctx_len}: RWKV-LM needs at least 3*ctx_len = "
            f"{3 * ctx_len} tokens (add data, repeat it with --repeat, or use a smaller --ctx-len)"
        )
    p = n_tokens // ctx_len - 1
    p -= (p - 2) % 3  # the largest candidate with p % 3 == 2
    while not is_prime(p):
        p -= 3
    return p


def golden_factor(p: int) -> int:
    """RWKV-LM's multiplier: int(p * 0.618...) evaluated in float64, as its dataset does (so orders match)."""
    return int(p * _GOLDEN)


def prime_ratio_ok(p: int, n_tokens: int, ctx_len: int) -> bool:
    """The check RWKV-LM's trainer asserts at start: 0.9 < p / (n_tokens // ctx_len) <= 1."""
    slots = n_tokens // ctx_len
    return slots > 0 and 0.9 < p / slots <= 1


@dataclass(frozen=True)
class WindowSampler:
    """Which window of the flat token stream each sample reads, exactly as RWKV-LM (v7 train_temp; v5 with
    my_pile_stage > 0 and my_pile_shift 0) would read it for the same data, ctx_len, micro_bsz and world size.

    Positions are counted in micro-batches per rank (`micro_step`, RWKV-LM's batch index summed over its
    mini-epochs): with gradient accumulation A, optimizer step s runs micro_steps s*A .. s*A + A - 1.
    """

    n_tokens: int
    ctx_len: int
    micro_bsz: int = 1
    world_size: int = 1
    magic_prime: int | None = None  # None: computed from n_tokens and ctx_len
    epoch_begin: int = 0  # RWKV-LM's --epoch_begin: the mini-epoch the run starts in

    def __post_init__(self):
        real_bsz = self.micro_bsz * self.world_size
        if real_bsz <= 0 or SAMPLES_PER_EPOCH % real_bsz:
            raise ConfigError(
                f"micro_bsz * world_size = {real_bsz} must divide {SAMPLES_PER_EPOCH} (RWKV-LM's mini-epoch); "
                f"e.g. 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128"
            )
        p = self.magic_prime if self.magic_prime is not None else magic_prime(self.n_tokens, self.ctx_len)
        if p % 3 != 2 or not is_prime(p):
            raise ConfigError(f"magic_prime {p} must be a prime with p % 3 == 2")
        if p * self.ctx_len + 1 > self.n_tokens:
            raise ConfigError(
                f"magic_prime {p} is too large for {self.n_tokens} tokens at ctx_len {self.ctx_len} "
                f"(at most {magic_prime(self.n_tokens, self.ctx_len)})"
            )
        object.__setattr__(self, "magic_prime", p)
        object.__setattr__(self, "_factor", golden_factor(p))

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per rank in one mini-epoch (RWKV-LM's epoch_steps)."""
        return SAMPLES_PER_EPOCH // (self.micro_bsz * self.world_size)

    @property
    def epoch_count(self) -> int:
        """RWKV-LM's epoch_count: the mini-epochs that cover the p chunks once."""
        return self.magic_prime // SAMPLES_PER_EPOCH

    def sample_number(self, micro_step: int, j: int = 0, rank: int = 0) -> int:
        """RWKV-LM's ii = 1 + epoch*40320 + idx*world_size + rank for row j of that micro-batch."""
        epoch = self.epoch_begin + micro_step // self.steps_per_epoch
        idx = (micro_step % self.steps_per_epoch) * self.micro_bsz + j
        return 1 + epoch * SAMPLES_PER_EPOCH + idx * self.world_size + rank

    def chunk(self, ii: int) -> int:
        """The chunk slot (0 .. p-1) sample number ii reads: (factor * ii^3) mod p."""
        p = self.magic_prime
        return self._factor * pow(ii % p, 3, p) % p

    def window_start(self, micro_step: int, j: int = 0, rank: int = 0) -> int:
        return self.chunk(self.sample_number(micro_step, j, rank)) * self.ctx_len

    def batch_starts(self, micro_step: int, rank: int = 0) -> list[int]:
        return [self.window_start(micro_step, j, rank) for j in range(self.micro_bsz)]
