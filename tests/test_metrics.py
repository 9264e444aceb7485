"""METHOD section 5 metrics on small hand-made inputs whose answers are known."""
import numpy as np
import pytest

from pipeline.espresso import metrics


def test_clip_accuracy_counts_blocked_outputs_as_not_showing_the_concept():
    p_eval = np.array([0.9, 0.8, 0.3, 0.6])
    blocked = np.array([True, False, False, True])
    prompts = ["a", "a", "b", "b"]
    result = metrics.clip_accuracy(p_eval, blocked, prompts, p_placeholder=0.7)
    assert result["clip_accuracy"]["value"] == pytest.approx((0 + 0.8 + 0.3 + 0) / 4)
    # hard: passed and P_eval > 0.5 -> only the second image
    assert result["clip_accuracy_hard"]["value"] == pytest.approx(1 / 4)
    # placeholder (the release's scoring): blocked images scored as the black image
    assert result["clip_accuracy_placeholder"]["value"] == pytest.approx((0.7 + 0.8 + 0.3 + 0.7) / 4)


def test_normalized_clip_score_scores_blocked_outputs_zero_and_skips_uninformative_images():
    before = np.array([0.30, 0.20, 0.0, 0.25])
    after = np.array([0.30, 0.0, 0.0, 0.20])  # 2nd blocked; 3rd has no unfiltered score
    result = metrics.normalized_clip_score(after, before, ["a", "b", "c", "d"])
    assert result["value"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert result["n"] == 3 and result["groups"] == 3


def test_error_rates_by_label_or_judge():
    blocked = np.array([True, True, False, False, True])
    positive = np.array([True, False, True, True, False])
    rates = metrics.error_rates(blocked, positive)
    assert rates["fnr"]["value"] == pytest.approx(2 / 3) and rates["fnr"]["n"] == 3
    assert rates["fpr"]["value"] == pytest.approx(2 / 2) and rates["fpr"]["n"] == 2


def test_wilson_interval_matches_the_textbook_formula():
    hits = np.array([True] * 4 + [False] * 28)  # 4 of 32
    rate = metrics.proportion(hits)
    n, p, z = 32, 4 / 32, 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert rate["value"] == pytest.approx(0.125)
    assert rate["low"] == pytest.approx(centre - half, abs=1e-6)
    assert rate["high"] == pytest.approx(centre + half, abs=1e-6)
    zero = metrics.proportion(np.zeros(128, bool))  # no event seen: still an upper bound
    assert zero["value"] == 0 and zero["low"] == 0 and 0.02 < zero["high"] < 0.04
    assert metrics.proportion(np.array([], bool))["value"] is None


def test_bootstrap_resamples_prompts_not_images():
    # two prompts, each with 50 identical images: the images carry no independent evidence
    values = np.array([0.0] * 50 + [1.0] * 50)
    prompts = ["a"] * 50 + ["b"] * 50
    clustered = metrics.clustered_mean(values, prompts)
    assert clustered["value"] == pytest.approx(0.5) and clustered["groups"] == 2
    # resampling 2 prompts gives means 0, 0.5 or 1: the interval spans (almost) everything
    assert clustered["low"] == 0.0 and clustered["high"] == 1.0
    # the same values as 100 independent prompts give a narrow interval around 0.5
    independent = metrics.clustered_mean(values, [str(i) for i in range(100)])
    assert 0.35 < independent["low"] < 0.5 < independent["high"] < 0.65


def test_bootstrap_is_deterministic_and_needs_two_prompts():
    rng = np.random.default_rng(1)
    values, prompts = rng.random(40), [str(i % 8) for i in range(40)]
    assert metrics.clustered_mean(values, prompts) == metrics.clustered_mean(values, prompts)
    one = metrics.clustered_mean(np.array([0.2, 0.4]), ["a", "a"])
    assert one["value"] == pytest.approx(0.3) and one["low"] is None


def test_judged_mean_score_averages_over_images_showing_the_concept():
    score = np.array([0.9, 0.1, 0.7, 0.99])
    shows = np.array([True, False, True, False])
    assert metrics.judged_mean_score(score, shows, list("abcd"))["value"] == pytest.approx(0.8)


def test_rates_differ_only_beyond_their_intervals():
    a = {"value": 0.1, "low": 0.05, "high": 0.15}
    assert metrics.beyond_intervals(a, {"value": 0.3, "low": 0.2, "high": 0.4}) is True
    assert metrics.beyond_intervals(a, {"value": 0.2, "low": 0.14, "high": 0.3}) is False
    assert metrics.beyond_intervals(a, {"value": 0.2, "low": None, "high": None}) is None
