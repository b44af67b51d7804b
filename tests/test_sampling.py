"""The sampler against the vectors of docs/spec/sampling.md §17 and an independent re-implementation."""
import math
from dataclasses import astuple

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from llama_ref.decoding.params import SamplingParams, SamplingParamsError
from llama_ref.decoding.sampling import (Sampler, apply_frequency_presence_penalties, apply_repetition_penalty,
                                         apply_temperature, min_p_filter, pipeline, top_k_filter, top_p_filter)


def survivors(logits) -> set[int]:
    return set(np.flatnonzero(np.asarray(logits) > -np.inf).tolist())


def log_probs(*probs):
    return np.log(np.array(probs, dtype=np.float64))


# --- validation: each rule names the field -------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be in [0, 100]"),
    (dict(temperature=float("nan")), "temperature must be a number"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be in [0, 99999]"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(min_p=1.1), "min_p must be in [0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be in [0.01, 5]"),
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-3), "frequency_penalty must be in [-2, 2]"),
    (dict(stop=[""]), "stop: every stop string must be a non-empty string"),
    (dict(stop=[str(i) for i in range(17)]), "stop: at most 16 strings, got 17"),
    (dict(n=3), "n must be in [1, 2]"),
    (dict(seed=-1), "seed must be in [0, 9223372036854775807]"),
    (dict(seed=2**63), "seed must be in"),
    (dict(max_new_tokens=-1), "max_new_tokens must be in"),
    (dict(top_logprobs=21), "top_logprobs must be in [0, 20]"),
    (dict(profile="tgi"), "profile must be one of reference, hf, vllm, llama.cpp; got 'tgi'"),
    (dict(profile="hf", presence_penalty=0.5), "the hf profile must leave them at 0"),
    (dict(profile="vllm", temperature=0, n=2), "n: the vllm profile rejects n > 1 with temperature 0"),
])
def test_invalid_parameters_name_the_field_and_rule(kwargs, message):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)
    assert err.value.param in kwargs


def test_neutral_values_are_accepted_and_a_single_stop_string_is_a_list():
    params = SamplingParams(top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, stop="###", max_new_tokens=0)
    assert params.stop == ("###",)


# --- §17 sampler vectors (reference profile) -----------------------------------------------

def test_g1_greedy_takes_the_lowest_id_on_ties():
    sampler = Sampler(SamplingParams(temperature=0), [], 3)
    assert sampler.sample(np.array([3.0, 5.0, 5.0])).token_id == 1


def test_g2_greedy_ignores_filters_and_consumes_no_randomness():
    logits = np.random.default_rng(0).standard_normal((20, 50))
    plain = Sampler(SamplingParams(temperature=0), [], 50)
    filtered = Sampler(SamplingParams(temperature=0, top_k=1, top_p=0.01, min_p=1.0, seed=7), [], 50)
    assert [plain.sample(z).token_id for z in logits] == [filtered.sample(z).token_id for z in logits]
    assert filtered.rng is None and filtered.seed is None


@pytest.mark.parametrize("probs, p, expected", [
    ((.5, .25, .25), .5, {0}),           # P1 (Meta keeps {0, 1})
    ((.5, .25, .125, .125), .75, {0, 1}),  # P2
    ((.5, .25, .25), .6, {0, 1}),        # P3: the tie goes to the lower id
])
def test_p_vectors_top_p(probs, p, expected):
    assert survivors(top_p_filter(log_probs(*probs), p)) == expected


def test_p4_and_k2_neutral_values_are_exact_no_ops():
    z = np.random.default_rng(1).standard_normal(32000)
    assert top_p_filter(z, 1.0) is z and top_k_filter(z, 0) is z and top_k_filter(z, 32000) is z
    assert min_p_filter(z, 0.0) is z and apply_temperature(z, 1.0) is z


def test_k1_top_k_keeps_ties_with_the_kth():
    assert survivors(top_k_filter(np.array([1.0, 1.0, 1.0, 0.0]), 2)) == {0, 1, 2}


def test_m1_min_p_after_top_p():
    z = top_p_filter(log_probs(.4, .3, .2, .1), .5)
    assert survivors(min_p_filter(z, .6)) == {0, 1}


def test_t1_t2_temperature_before_top_p_and_min_p():
    z = apply_temperature(log_probs(.4, .3, .2, .1), .5)
    post = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.allclose(post, [.5333333, .3, .1333333, .0333333], atol=1e-6)
    assert survivors(top_p_filter(z, .5)) == {0}
    assert survivors(min_p_filter(z, .6)) == {0}


def test_t3_tiny_temperature_is_exact_division():
    z = np.array([1.0, 1.0 + 1e-5, 0.0])
    assert np.array_equal(apply_temperature(z, 1e-6), z / 1e-6)
    sampler = Sampler(SamplingParams(temperature=1e-6, seed=0), [], 3)
    assert {sampler.sample(z).token_id for _ in range(50)} == {1}


@pytest.mark.parametrize("z", [[3.0, 7.5, 7.5, -np.inf, 1.0], [-3.0, -0.5, -0.5, -9.0, -np.inf]])
def test_a_temperature_so_small_that_z_over_t_overflows_takes_its_limit(z):
    """Found by the fuzzer: T = 2.2e-309 made z / T infinite and the softmax NaN. The limit
    T -> 0+ keeps the largest logits, equally likely; logits all negative overflow to -inf."""
    z = np.array(z)
    with np.errstate(all="raise"):
        limit = apply_temperature(z, 2.2250738585072e-309)
        assert np.array_equal(limit, [-np.inf, 0, 0, -np.inf, -np.inf])
        for profile in ["reference", "hf", "llama.cpp"]:
            sampler = Sampler(SamplingParams(temperature=2.2250738585072e-309, top_p=0.9, profile=profile, seed=1), [], 5)
            assert {sampler.sample(z).token_id for _ in range(40)} == {1, 2}, profile


@pytest.mark.parametrize("r, expected", [(2.0, [1, -4, 0.5, 1]), (0.5, [4, -1, 0.5, 1])])
def test_r1_r2_repetition_penalty_over_prompt_and_generated(r, expected):
    z = np.array([2.0, -2.0, 0.5, 1.0])
    assert np.array_equal(apply_repetition_penalty(z, np.array([0, 1]), r), expected)


def test_f1_frequency_and_presence_over_generated_ids_only():
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=.5, presence_penalty=1.0), [1, 5, 5, 5], 8)
    for token in [5, 5, 7]:
        sampler.accept(token)
    z = apply_frequency_presence_penalties(np.zeros(8), sampler.generated_counts, .5, 1.0)
    assert (z[5], z[7], z[1]) == (-2.0, -1.5, 0.0)


def test_f2_penalties_sent_as_zero_are_exact_no_ops():
    z = np.random.default_rng(2).standard_normal(64)
    counts = np.random.default_rng(3).integers(0, 4, 64)
    assert apply_frequency_presence_penalties(z, counts, 0.0, 0.0) is z
    logits = np.random.default_rng(4).standard_normal((12, 64))
    plain = Sampler(SamplingParams(seed=9), [1, 2, 3], 64)
    explicit = Sampler(SamplingParams(seed=9, presence_penalty=0, frequency_penalty=0, repetition_penalty=1), [1, 2, 3],
                       64)
    assert [plain.sample(z).token_id for z in logits] == [explicit.sample(z).token_id for z in logits]


def test_s7_empty_or_too_many_stop_strings_are_rejected():
    with pytest.raises(SamplingParamsError, match="stop: every stop string must be a non-empty string"):
        SamplingParams(stop=["ok", ""])
    with pytest.raises(SamplingParamsError, match="stop: at most 16 strings, got 17"):
        SamplingParams(stop=[f"s{i}" for i in range(17)])


# --- the draw, reproduced by an independent implementation ---------------------------------

def independent_stages(logits, params, prompt, generated):
    """docs/spec/sampling.md steps 3-9 written again, with plain Python loops and sorting:
    [(stage, {id: probability})] after the repetition penalty, the frequency and presence
    penalties, temperature, top_k, top_p and min_p (only the first two when greedy). An id
    missing from a stage's dict was removed."""
    z = [float(v) for v in logits]
    alive = list(range(len(z)))

    def probs(ids):
        top = max(z[j] for j in ids)
        weights = {j: math.exp(z[j] - top) for j in ids}
        return {j: w / sum(weights.values()) for j, w in weights.items()}
    for j in set(prompt) | set(generated):
        z[j] = z[j] / params.repetition_penalty if z[j] > 0 else z[j] * params.repetition_penalty
    stages = [("repetition_penalty", probs(alive))]
    for j in set(generated):
        z[j] -= params.frequency_penalty * generated.count(j) + params.presence_penalty
    stages.append(("frequency_presence", probs(alive)))
    if params.temperature == 0:
        return stages
    z = [v / params.temperature for v in z]
    stages.append(("temperature", probs(alive)))
    if 0 < params.top_k < len(z):
        kth = sorted(z, reverse=True)[params.top_k - 1]
        alive = [j for j in alive if z[j] >= kth]
    stages.append(("top_k", probs(alive)))
    if params.top_p < 1:
        p, mass, kept = probs(alive), 0.0, []
        for j in sorted(alive, key=lambda j: (-p[j], j)):
            if mass < params.top_p:
                kept.append(j)
            mass += p[j]
        alive = sorted(kept)
    stages.append(("top_p", probs(alive)))
    if params.min_p > 0:
        p = probs(alive)
        alive = [j for j in alive if p[j] >= params.min_p * max(p.values())]
    stages.append(("min_p", probs(alive)))
    return stages


def independent_sample(logits, params, prompt, generated, u):
    """Step 10 on independent_stages: the lowest id on ties when greedy, else the first id
    (in id order) whose cumulative probability passes u."""
    p = independent_stages(logits, params, prompt, generated)[-1][1]
    if params.temperature == 0:
        return min(p, key=lambda j: (-p[j], j))
    total = 0.0
    for j in sorted(p):
        total += p[j]
        if total > u:
            return j
    return max(p)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.6]),
       top_k=st.integers(0, 12), top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.5),
       repetition=st.floats(0.5, 2.0), frequency=st.floats(-1, 1), presence=st.floats(-1, 1))
def test_an_independent_implementation_reproduces_our_tokens(seed, temperature, top_k, top_p, min_p, repetition,
                                                           frequency, presence):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                            repetition_penalty=repetition, frequency_penalty=frequency, presence_penalty=presence)
    rng = np.random.default_rng(seed % 1000)
    prompt = rng.integers(0, 10, size=4).tolist()
    sampler = Sampler(params, prompt, 10)
    their_rng = np.random.Generator(np.random.PCG64(seed))
    generated = []
    for _ in range(8):
        logits = (rng.standard_normal(10) * 2).astype(np.float32)
        u = their_rng.random() if temperature > 0 else 0.0
        expected = independent_sample(logits, params, prompt, generated, u)
        assert sampler.sample(logits).token_id == expected
        generated.append(expected)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, seed=11),
    SamplingParams(temperature=1.3, top_k=5, seed=12),
    SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, seed=13),
])
def test_draw_frequencies_match_the_filtered_distribution(params):
    logits = np.random.default_rng(5).standard_normal(12) * 1.5
    sampler = Sampler(params, [], 12)
    final = independent_stages(logits, params, [], [])[-1][1]
    expected = np.array([final.get(j, 0.0) for j in range(12)])
    counts = np.zeros(12)
    for _ in range(20_000):
        token = sampler.sample(logits).token_id
        sampler.generated_counts[:] = 0  # penalties are neutral here; keep the draws independent
        counts[token] += 1
    alive = expected > 0
    assert counts[~alive].sum() == 0
    assert stats.chisquare(counts[alive], expected[alive] * 20_000).pvalue > 0.001


def test_logprob_is_under_the_final_distribution():
    sampler = Sampler(SamplingParams(temperature=0.5, top_k=2, seed=3), [], 4)
    token, logprob = astuple(sampler.sample(np.log(np.array([.4, .3, .2, .1]))))[:2]
    z = np.log(np.array([.4, .3])) / .5
    assert math.isclose(logprob, z[token] - np.log(np.exp(z).sum()), rel_tol=1e-12)


def test_without_a_seed_one_is_drawn_and_reported():
    a, b = Sampler(SamplingParams(), [], 4), Sampler(SamplingParams(), [], 4)
    assert 0 <= a.seed < 2**63 and a.seed != b.seed


# --- profiles: the §17 results the table lists for the other engines -----------------------

def final_logits(params, logits, prompt=(), generated=()):
    """Steps 3-9 of params.profile, run through the profile's own pipeline list."""
    sampler = Sampler(params, prompt, len(logits))
    for token in generated:
        sampler.accept(token)
    penalties, filters = pipeline(params, sampler)
    z = np.asarray(logits, dtype=np.float64)
    for stage in penalties + ([] if params.greedy else filters):
        z = stage.apply(z)
    return z


@pytest.mark.parametrize("profile, expected", [("reference", {0, 1}), ("hf", {0, 1}), ("vllm", {0}),
                                               ("llama.cpp", {0, 1})])
def test_m1_min_p_and_top_p_order_per_profile(profile, expected):
    params = SamplingParams(min_p=.6, top_p=.5, profile=profile)
    assert survivors(final_logits(params, log_probs(.4, .3, .2, .1))) == expected


@pytest.mark.parametrize("profile, expected", [("reference", {0}), ("hf", {0}), ("vllm", {0}), ("llama.cpp", {0, 1})])
@pytest.mark.parametrize("filters", [dict(top_p=.5), dict(min_p=.6)])  # T1, T2
def test_t1_t2_temperature_position_per_profile(profile, expected, filters):
    params = SamplingParams(temperature=.5, profile=profile, **filters)
    assert survivors(final_logits(params, log_probs(.4, .3, .2, .1))) == expected


@pytest.mark.parametrize("profile, expected", [("reference", {0, 1, 2}), ("hf", {0, 1, 2}), ("vllm", {0, 1, 2}),
                                               ("llama.cpp", {0, 1})])
def test_k1_top_k_ties_per_profile(profile, expected):
    params = SamplingParams(top_k=2, profile=profile)
    assert survivors(final_logits(params, [1.0, 1.0, 1.0, 0.0])) == expected


@pytest.mark.parametrize("probs, p, expected", [((.5, .25, .25), .5, {0}), ((.5, .25, .125, .125), .75, {0, 1})])
def test_p1_p2_top_p_boundary_llama_cpp(probs, p, expected):
    assert survivors(final_logits(SamplingParams(top_p=p, profile="llama.cpp"), log_probs(*probs))) == expected


@pytest.mark.parametrize("profile", ["hf", "vllm"])
@pytest.mark.parametrize("probs, p, expected", [
    ((.5, .25, .25), .5, {0}),
    # P2 in float64: the cumulative sum of the two 0.125s rounds just above 1 - p = 0.25, so
    # transformers' own warper keeps id 3 too ({0, 1} is its float32 result, §17's column).
    ((.5, .25, .125, .125), .75, {0, 1, 3}),
])
def test_p1_p2_top_p_boundary_hf_vllm_as_transformers_float64(profile, probs, p, expected):
    z = log_probs(*probs)
    theirs = TopPLogitsWarper(p)(None, torch.tensor(z)[None])[0].numpy()
    assert survivors(final_logits(SamplingParams(top_p=p, profile=profile), z)) == survivors(theirs) == expected


def test_p3_ties_at_the_top_p_cut_go_to_the_higher_id_in_hf_and_vllm():
    """Their ascending stable sort removes the lower of two tied ids first (reference keeps it)."""
    for profile in ["hf", "vllm"]:
        assert survivors(final_logits(SamplingParams(top_p=.6, profile=profile), log_probs(.5, .25, .25))) == {0, 2}


@pytest.mark.parametrize("profile, expected", [
    ("reference", {5: -2.0, 7: -1.5, 1: 0.0}), ("vllm", {5: -2.0, 7: -1.5, 1: 0.0}),
    ("llama.cpp", {5: -3.5, 7: -1.5, 1: -1.5}),   # the 64-token window holds the prompt too
])
def test_f1_penalty_counts_per_profile(profile, expected):
    params = SamplingParams(temperature=0, frequency_penalty=.5, presence_penalty=1.0, profile=profile)
    z = final_logits(params, np.zeros(8), prompt=[1, 5, 5, 5], generated=[5, 5, 7])
    assert {j: z[j] for j in expected} == expected


def test_llama_cpp_penalties_see_only_the_last_64_tokens():
    params = SamplingParams(temperature=0, repetition_penalty=2.0, profile="llama.cpp")
    z = final_logits(params, np.full(8, 1.0), prompt=[3] + [6] * 70, generated=[7])
    assert z.tolist() == [1, 1, 1, 1, 1, 1, .5, .5]   # id 3 fell out of the window


def test_t3_vllm_clamps_tiny_temperatures_and_reference_does_not():
    logits = np.array([1.0, 1.0 + 1e-5, 0.0])
    vllm = final_logits(SamplingParams(temperature=1e-6, profile="vllm"), logits)
    assert np.array_equal(vllm, logits / 0.01)
    assert np.array_equal(final_logits(SamplingParams(temperature=1e-6), logits), logits / 1e-6)


def test_r1_repetition_penalty_agrees_in_every_profile():
    for profile in ["reference", "hf", "vllm", "llama.cpp"]:
        params = SamplingParams(temperature=0, repetition_penalty=2.0, profile=profile)
        z = final_logits(params, [2.0, -2.0, 0.5, 1.0], prompt=[0], generated=[1])
        assert z.tolist() == [1, -4, 0.5, 1], profile


def test_top_logprobs_lists_only_tokens_the_filters_kept():
    """More top_logprobs than survivors (top_k 2, 5 asked): the two survivors, with their
    probabilities renormalised by hand, and no -inf entry (which JSON cannot carry)."""
    logits = np.array([3.0, 1.0, 2.0, 0.0, -1.0])
    sample = Sampler(SamplingParams(top_k=2, top_logprobs=5, seed=0), [], len(logits)).sample(logits)
    total = np.exp(3.0) + np.exp(2.0)
    assert [token for token, _ in sample.top_logprobs] == [0, 2]
    assert np.allclose([lp for _, lp in sample.top_logprobs], [3.0 - np.log(total), 2.0 - np.log(total)])
