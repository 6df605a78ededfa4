import numpy as np
import pytest
import torch

from rwkvkit.errors import ConfigError
from rwkvkit.runtime.sampling import (
    Penalties,
    Sampler,
    SamplingParams,
    ban_tokens,
    filtered_probs,
    penalty_weight,
    top_p_cutoff,
)


def test_top_p_keeps_the_smallest_prefix_reaching_p_and_ties_with_the_cutoff():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1])
    logits = probs.log()
    # sorted: .4 .2 .2 .1 .1 -> cumsum reaches 0.5 at the first .2; the other .2 ties the cutoff and stays
    kept = filtered_probs(logits, top_p=0.5) > 0
    assert kept.tolist() == [False, True, True, True, False]
    assert (filtered_probs(logits, top_p=0.3) > 0).tolist() == [False, True, False, False, False]
    out = filtered_probs(logits, top_p=0.5)
    assert torch.allclose(out[kept], torch.tensor([0.5, 0.25, 0.25]))


def test_top_p_one_keeps_every_token_even_when_the_float_sum_falls_short():
    logits = torch.randn(65536, generator=torch.Generator().manual_seed(0)) * 3
    assert bool((filtered_probs(logits, top_p=1.0) > 0).all())


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat to peaked: the partial top-k search widens as needed
@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.9, 0.999])
def test_top_p_cutoff_equals_the_full_sort_rule(scale, top_p):
    probs = torch.softmax(torch.randn(2, 65536, generator=torch.Generator().manual_seed(4)) * scale, -1)
    sorted_probs = probs.sort(-1, descending=True).values
    first = (sorted_probs.cumsum(-1) < top_p).sum(-1, keepdim=True).clamp(max=65535)
    assert torch.equal(top_p_cutoff(probs, top_p), sorted_probs.gather(-1, first))


def test_top_k_keeps_exactly_k_most_likely():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    assert (filtered_probs(logits, top_p=1.0, top_k=2) > 0).tolist() == [False, True, False, True, False]
    assert (filtered_probs(logits, top_p=1.0, top_k=0) > 0).all()  # 0 = off


def test_temperature_is_applied_after_truncation_to_probabilities():
    logits = torch.tensor([2.0, 1.0, 0.0, -5.0])
    p = torch.softmax(logits, -1)
    expected = torch.zeros(4)
    expected[:3] = p[:3] ** 2 / (p[:3] ** 2).sum()
    assert torch.allclose(filtered_probs(logits, temperature=0.5, top_p=0.99), expected, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0, top_p=0.9), dict(temperature=1.0, top_p=1e-6)])
def test_temperature_zero_or_tiny_top_p_is_greedy(kwargs):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(SamplingParams(**kwargs), 50, seed=0)
    assert {sampler(logits) for _ in range(20)} == {int(logits.argmax())}


def test_seeded_sampler_is_deterministic_and_seeds_differ():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0, top_p=1.0)
    a, b, c = (Sampler(params, 1000, seed=s) for s in (5, 5, 6))
    draws_a, draws_b, draws_c = ([s(logits) for _ in range(30)] for s in (a, b, c))
    assert draws_a == draws_b
    assert draws_a != draws_c


def test_bans_are_never_sampled():
    logits = torch.zeros(10)
    logits[3] = 10.0
    sampler = Sampler(SamplingParams(top_p=1.0, banned_tokens=(3, 4)), 10, seed=0)
    assert not {sampler(logits) for _ in range(200)} & {3, 4}
    assert ban_tokens(logits, []) is logits


def test_penalties_follow_the_official_order_decay_then_add():
    pen = Penalties(5, presence=0.5, frequency=0.25, decay=0.5)
    pen.update(1)
    pen.update(1)  # count 1 * 0.5 + 1 = 1.5
    pen.update(2, weight=0.0)  # seen (presence applies) but free of frequency; token 1 decays to 0.75
    out = pen.apply(torch.zeros(5))
    assert torch.allclose(out, torch.tensor([0.0, -(0.5 + 0.75 * 0.25), -0.5, 0.0, 0.0]))


def test_penalty_free_texts_are_spaces_tabs_and_digit_runs():
    assert [penalty_weight(t) for t in (" ", "\t", "7", "123", "a", " a", "\n")] == [0, 0, 0, 0, 1, 1, 1]


def test_penalties_change_the_sampled_distribution():
    logits = torch.tensor([1.0, 1.0])
    sampler = Sampler(SamplingParams(top_p=1.0, presence_penalty=100.0), 2, seed=0)
    sampler.accept(0)
    assert {sampler(logits) for _ in range(50)} == {1}


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(top_p=1.5), dict(top_k=-2), dict(penalty_decay=2.0)]
)
def test_invalid_parameters_are_config_errors(bad):
    with pytest.raises(ConfigError):
        SamplingParams(**bad)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 0.7, 0), (0.7, 0.9, 0), (1.3, 0.5, 20), (1.0, 0.85, 5)])
def test_compat_sample_logits_draws_like_the_official_pipeline(temperature, top_p, top_k):
    utils = pytest.importorskip("rwkv.utils")
    from rwkvkit.compat import PIPELINE

    official = utils.PIPELINE.__new__(utils.PIPELINE)  # sample_logits needs no tokenizer
    ours = PIPELINE.__new__(PIPELINE)
    logits = torch.randn(300, generator=torch.Generator().manual_seed(3)) * 2
    draws = {}
    for name, pipe in (("official", official), ("ours", ours)):
        np.random.seed(1234)  # both draw from numpy's global RNG on CPU
        draws[name] = [pipe.sample_logits(logits.clone(), temperature, top_p, top_k) for _ in range(300)]
    agree = np.mean(np.array(draws["official"]) == np.array(draws["ours"]))
    assert agree >= 0.99, agree
