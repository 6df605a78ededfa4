import math

import pytest

from rwkvkit.data.sampler import SAMPLES_PER_EPOCH, WindowSampler, golden_factor, is_prime, magic_prime
from rwkvkit.errors import ConfigError, DataError


def test_magic_prime_reference_values():
    # MiniPile (World vocab) and the Pile 20B-tokenizer file, as RWKV-LM's scripts use them
    assert magic_prime(1_498_226_207, 512) == 2_926_181
    assert magic_prime(1_498_226_207, 4096) == 365_759
    assert magic_prime(332_115_325_534, 4096) == 81_082_817


def test_magic_prime_small_cases_by_hand():
    assert magic_prime(100, 4) == 23  # 100 // 4 - 1 = 24; 23 is prime and 23 % 3 == 2
    assert magic_prime(108, 4) == 23  # 26 is not 2 mod 3, 26 -> 23
    assert magic_prime(12, 4) == 2  # exactly 3 * ctx_len: one chunk slot below 3 -> p = 2
    assert magic_prime(4 * 30, 4) == 29  # 29: prime and 2 mod 3 (was found from 29 itself)


def test_too_little_data_says_what_is_needed():
    with pytest.raises(DataError, match=r"at least 3\*ctx_len = 12288"):
        magic_prime(12_000, 4096)


def test_is_prime_agrees_with_trial_division():
    def slow(n):
        return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))

    assert [n for n in range(3000) if is_prime(n)] == [n for n in range(3000) if slow(n)]
    assert is_prime(2_926_181) and not is_prime(2_926_181 * 7)


def test_hand_computed_windows_for_p_11():
    s = WindowSampler(n_tokens=12 * 4 + 1, ctx_len=4, magic_prime=11)
    assert golden_factor(11) == 6  # int(11 * 0.618...)
    # ii = 1, 2, 3, 4 -> 6*1 % 11 = 6, 6*8 % 11 = 4, 6*27 % 11 = 8, 6*64 % 11 = 10; times ctx_len 4
    assert [s.window_start(k) for k in range(4)] == [24, 16, 32, 40]


@pytest.mark.parametrize("p", [2, 5, 11, 17, 23, 29, 41, 47, 53, 59])
def test_cube_permutation_is_a_bijection(p):
    s = WindowSampler(n_tokens=(p + 1) * 3 + 1, ctx_len=3, magic_prime=p)
    for first in (1, 1000):  # any p consecutive sample numbers visit every chunk once
        assert sorted(s.chunk(ii) for ii in range(first, first + p)) == list(range(p))


def test_sample_numbers_follow_rwkv_lm_layout():
    s = WindowSampler(n_tokens=10**6, ctx_len=16, micro_bsz=2, world_size=2)
    assert s.steps_per_epoch == SAMPLES_PER_EPOCH // 4
    # ii = 1 + epoch*40320 + idx*world + rank, idx = step_in_epoch*micro_bsz + j
    assert [s.sample_number(0, j, rank=1) for j in range(2)] == [2, 4]
    assert s.sample_number(3, 1, rank=0) == 1 + (3 * 2 + 1) * 2
    assert s.sample_number(s.steps_per_epoch, 0, 0) == 1 + SAMPLES_PER_EPOCH
    shifted = WindowSampler(n_tokens=10**6, ctx_len=16, micro_bsz=2, world_size=2, epoch_begin=3)
    assert shifted.sample_number(0) == 1 + 3 * SAMPLES_PER_EPOCH


def test_window_start_is_exact_at_pile_scale():
    p = 81_082_817
    s = WindowSampler(n_tokens=332_115_325_534, ctx_len=4096, micro_bsz=8, world_size=8, magic_prime=p)
    factor = int(p * ((math.sqrt(5) - 1) / 2))
    for step in (0, 1, 10**6, 3 * 10**7):
        ii = s.sample_number(step, 7, 5)
        assert s.window_start(step, 7, 5) == (factor * ii * ii * ii) % p * 4096  # Python big ints as reference


def test_batch_geometry_must_divide_40320():
    with pytest.raises(ConfigError, match="must divide 40320"):
        WindowSampler(n_tokens=10**6, ctx_len=16, micro_bsz=11)


def test_bad_magic_prime_is_refused():
    with pytest.raises(ConfigError, match="prime"):
        WindowSampler(n_tokens=10**6, ctx_len=16, magic_prime=13)  # 13 % 3 == 1
    with pytest.raises(ConfigError, match="too large"):
        WindowSampler(n_tokens=100, ctx_len=4, magic_prime=29)
