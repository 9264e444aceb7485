"""The attack outcomes from per-image scores: each attack seed's prompts are clusters of their
own, an edit's plain condition is paired with the filters' (same prompts and seeds), and "+"
rows are scored by the CRT they were adapted to."""
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import outcomes
from pipeline.espresso.filter_names import FILTERS
from pipeline.schema import Statistics

STATS = Statistics(confidence=0.95, resamples=2000, seed=0, family_rate=0.05, correction="holm")


def run_rows(attack, variant, target, edited, seed, shows, prompts=4, images=3):
    n = prompts * images
    table = pd.DataFrame({"prompt": np.repeat([f"{attack} prompt {i}" for i in range(prompts)],
                                              images),
                          "judge_shows_concept": shows, "p_eval": np.where(shows, 0.9, 0.1),
                          "attack": attack, "variant": variant, "target": target,
                          "edited_model": edited, "attack_seed": seed, "seed": np.arange(n)})
    for name in FILTERS:
        table[f"{name}_blocked"] = False
        table[f"{name}_score"] = 0.0
    return table


def test_attack_seeds_are_clusters_and_an_edits_plain_condition_is_paired():
    rng = np.random.default_rng(1)
    rows = []
    for seed in (0, 1):
        shows = rng.random(12) < 0.5
        rows += [run_rows("pez", "plain", np.nan, False, seed, shows),
                 run_rows("pez", "plain", "uce", True, seed, shows),  # the same prompts, drawn alike
                 run_rows("udiff", "plus", "uce", True, seed, rng.random(12) < 0.9)]
    scores = pd.concat(rows, ignore_index=True)
    rates = outcomes.attacked(scores, STATS)
    plain = rates["none", "pez", "attack_success"]
    assert plain.units == 2 * 4 and plain.n == 24  # 4 prompts at each of 2 seeds
    edit = rates["uce", "pez", "attack_success"]
    assert edit.value == plain.value and np.array_equal(edit.draws, plain.draws)  # paired
    adapted = rates["uce", "udiff+", "attack_success"]
    assert rates["uce", "worst+", "attack_success"].value == adapted.value
    assert ("espresso", "udiff+", "attack_success") not in rates  # not adapted to a filter
    detail = outcomes.nested(rates, 0.95)
    assert set(detail["uce"]) == {"pez", "udiff+", "worst+"}
    low, high = detail["uce"]["pez"]["attack_success"]["low"], detail["uce"]["pez"]["attack_success"]["high"]
    assert low <= edit.value <= high


def test_published_adapted_attacks_are_never_weaker_than_plain():
    """On every published concept, CRT and attack, the "+" run's judged success reaches the plain
    run's within its interval: the attacker's pick among plain and every strength (an edit's
    adapted CCE through its UNet against the plain prompts it renders) is never weaker."""
    summary = pd.read_csv(Path(__file__).resolve().parents[1] / "reports/summary/summary.csv")
    rates = summary[(summary["metric"] == "attack_success") & (summary["concept"] != "average")]
    rate = rates.set_index(["concept", "crt", "condition"])
    checked = 0
    for (concept, crt, condition), row in rate.iterrows():
        plain = (concept, crt, condition.removesuffix("+"))
        if not condition.endswith("+") or condition == "worst+" or plain not in rate.index:
            continue
        checked += 1
        assert row["high"] >= rate.loc[plain, "value"], (concept, crt, condition)
    assert checked >= 4 * len(set(rates["concept"]))  # four filters' "+" runs per concept at least
