"""Intervals at the unit of sampling (pipeline.statistics): known answers and planted structure."""
import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from pipeline import statistics
from pipeline.schema import Statistics

STATS = Statistics(confidence=0.95, resamples=2000, seed=0, correction="holm", family_rate=0.05)


def clustered(rates, images: int = 8, rng=None):
    """Per-image 0/1 values drawn with each cluster's own rate, and the cluster of each."""
    rng = rng or np.random.default_rng(0)
    values = np.concatenate([rng.random(images) < p for p in rates]).astype(float)
    return values, np.repeat([f"prompt {i}" for i in range(len(rates))], images)


def test_all_zero_prompts_get_the_exact_bound_of_their_count_not_zero_width():
    values, prompts = clustered([0.0] * 8, images=16)
    out = statistics.rate(values, prompts, STATS)
    assert out["method"] == "exact" and out["value"] == 0.0 and out["low"] == 0.0
    assert out["high"] == pytest.approx(1 - 0.025 ** (1 / 8))   # 0 of 8 prompts, not 0 of 128
    assert out["clusters"] == 8 and out["n"] == 128


def test_prompts_all_zero_or_all_one_count_as_prompts():
    values, prompts = clustered([1, 1, 1, 0, 0, 0, 0, 0], images=16)
    out = statistics.rate(values, prompts, STATS)
    low, high = proportion_confint(3, 8, alpha=0.05, method="beta")
    assert (out["low"], out["high"]) == pytest.approx((low, high))


def test_planted_clusters_are_covered_where_an_image_level_interval_is_not():
    """Prompts with their own rates (a strong prompt effect): the bootstrap over prompts covers
    the mean of the prompt rates about 95% of the time; Wilson over images, which takes the
    images as independent, covers it far less often."""
    rng = np.random.default_rng(1)
    stats = Statistics(confidence=0.95, resamples=500, seed=0, correction="holm",
                       family_rate=0.05)
    covered = wilson_covered = 0
    trials = 200
    for _ in range(trials):
        rates = rng.beta(0.6, 1.4, size=16)                       # mean 0.3, widely spread
        values, prompts = clustered(rates, images=8, rng=rng)
        out = statistics.rate(values, prompts, stats)
        covered += out["low"] <= 0.3 <= out["high"]
        low, high = proportion_confint(values.sum(), values.size, method="wilson")
        wilson_covered += low <= 0.3 <= high
    assert covered / trials >= 0.90
    assert wilson_covered / trials <= 0.80


def test_an_average_over_concepts_carries_their_spread():
    """Six concepts, each measured precisely (many prompts) but far apart: the average's
    interval is about as wide as a t interval over the six concept rates, not the pooled one."""
    concepts = {}
    rates = [0.0, 0.02, 0.05, 0.1, 0.3, 0.5]
    for k, rate in enumerate(rates):
        values, prompts = clustered([rate] * 64, images=16, rng=np.random.default_rng(k))
        concepts[f"c{k}"] = statistics.estimate(values, prompts, STATS)
    out = statistics.average(concepts, STATS).interval(STATS.confidence)
    from scipy.stats import t
    spread = t.ppf(0.975, 5) * np.std(rates, ddof=1) / np.sqrt(6)
    assert out["value"] == pytest.approx(np.mean([e.value for e in concepts.values()]))
    assert out["high"] - out["low"] >= 1.5 * spread
    assert out["clusters"] == 6


def test_differences_are_paired_where_the_prompts_are_the_same():
    """B passes exactly one more image per prompt than A: on the same prompts the difference is
    certain; the same numbers on other prompts (unpaired) are not."""
    rng = np.random.default_rng(3)
    rates = rng.uniform(0.1, 0.8, 12)
    a, prompts = clustered(rates, images=16, rng=rng)
    b = a.copy()
    for i in range(12):
        b[np.flatnonzero((prompts == f"prompt {i}") & (a == 0))[:1]] = 1
    paired = statistics.difference(statistics.estimate(b, prompts, STATS),
                                   statistics.estimate(a, prompts, STATS))
    unpaired = statistics.difference(statistics.estimate(b, prompts, STATS),
                                     statistics.estimate(a, np.char.add("x", prompts), STATS))
    assert statistics.p_value(paired) < 0.001
    assert statistics.p_value(unpaired) > 0.05
    assert paired.interval(0.95)["low"] > 0


def test_holm_keeps_the_claims_its_step_down_keeps():
    reject, adjusted = statistics.controlled([0.01, 0.04, 0.045], STATS)
    assert reject.tolist() == [True, False, False]
    assert adjusted == pytest.approx([0.03, 0.08, 0.08])
    bh = Statistics(**{**STATS.model_dump(), "correction": "fdr_bh"})
    assert statistics.controlled([0.01, 0.04, 0.045], bh)[0].tolist() == [True, True, True]


def test_the_worst_of_several_runs_is_taken_draw_by_draw():
    low_run = statistics.estimate(*clustered([0.1] * 8), STATS)
    high_run = statistics.estimate(*clustered([0.6] * 8), STATS)
    both = statistics.worst([low_run, high_run])
    assert both.value == high_run.value
    assert np.all(both.draws >= high_run.draws)


def test_the_average_of_one_concept_is_that_concept():
    values, prompts = clustered([0.2, 0.5, 0.1, 0.4], images=8)
    alone = statistics.estimate(values, prompts, STATS)
    assert statistics.average({"only": alone}, STATS) is alone


def test_a_single_prompt_gets_the_widest_honest_interval_not_none():
    values, prompts = clustered([0.5], images=8, rng=np.random.default_rng(4))
    out = statistics.rate(values, prompts, STATS)
    assert out["clusters"] == 1 and out["method"] == "exact"
    assert out["low"] < out["value"] < out["high"] and out["high"] - out["low"] > 0.8
