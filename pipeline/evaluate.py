"""DVC stage ``evaluate``: METHOD section 5 metrics on the test split, for every filter, each
rate with its 95% interval (``pipeline.espresso.metrics``).

Filters compared: none; a prompt keyword blocklist; a single-concept cosine threshold in the style
of the SD safety checker (threshold calibrated on validation images); Espresso zero-shot; Espresso
fine-tuned. CLIP accuracy and CLIP score always use the *original* CLIP; the judge (mini: the
world's CNN, paper: a different open_clip model) says what each image really shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from pipeline.espresso import FILTERS, Decision, EspressoFilter, FilterBank
from pipeline.espresso.files import write_csv, write_json
from pipeline.espresso.metrics import (clip_accuracy, clip_views, error_rates, judged_mean_score,
                                       normalized_clip_score, proportion)
from pipeline.finetune import FILTER_DIR
from pipeline.generate import MANIFEST, load_images
from pipeline.judges import load_extra_judges, load_judge
from pipeline.params import run_stage, settings_of

REPORTS = Path("reports/evaluate")
NEEDS = {MANIFEST: "generate", FILTER_DIR: "finetune"}


def run(params: dict) -> dict:
    setting, concept, models = settings_of(params)
    manifest = pd.read_csv(MANIFEST)
    bank = load_filter_bank(models["clip"], concept, manifest)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    images, prompts = load_images(test), test["prompt"].tolist()
    unacceptable = (test["label"] == "unacceptable").to_numpy()
    features = bank.zero_shot.embed(images)
    decisions = bank.decide(images, prompts, features)
    views = clip_views(bank.zero_shot, features, prompts, images.shape[1:])
    shows = load_judge(setting, models, concept)(images)
    second_opinions = {name: judge(images)
                       for name, judge in load_extra_judges(setting, concept).items()}
    table = test[["prompt", "seed", "label"]].assign(judge_shows_concept=shows,
                                                      p_eval=views["p_eval"],
                                                      clip_score=views["clip_score"])
    for judge_name, opinion in second_opinions.items():
        table[f"{judge_name}_shows_concept"] = opinion
    metrics = {name: filter_metrics(decisions[name], views, prompts, unacceptable, shows,
                                    second_opinions)
               for name in FILTERS}
    for name in FILTERS:
        table[f"{name}_score"] = decisions[name].score
        table[f"{name}_blocked"] = decisions[name].blocked
    metrics["threshold_cut"] = bank.threshold
    # what the placeholder-scored CLIP accuracy gives a filter that blocks everything
    metrics["black_image_p_unacceptable"] = views["p_eval_black"]
    metrics["n_test_images"] = len(test)
    metrics["judged_unacceptable_share"] = proportion(shows[unacceptable])
    metrics["judged_acceptable_share"] = proportion(~shows[~unacceptable])
    write_json(REPORTS / "metrics.json", metrics)
    write_csv(REPORTS / "scores.csv", table)
    return metrics


def filter_metrics(decision: Decision, views: dict, prompts: list[str], unacceptable: np.ndarray,
                   shows: np.ndarray, second_opinions: dict[str, np.ndarray]) -> dict:
    """METHOD section 5 for one filter on the test split: effectiveness on unacceptable
    prompts, utility on acceptable prompts, FNR/FPR by prompt label and by judge(s)."""
    prompts = np.asarray(prompts, object)
    blocked = decision.blocked
    u = unacceptable
    by_label = error_rates(blocked, u)
    by_judge = error_rates(blocked, shows)
    return {
        **clip_accuracy(views["p_eval"][u], blocked[u], prompts[u], views["p_eval_black"]),
        "normalized_clip_score": normalized_clip_score(
            np.where(blocked, 0.0, views["clip_score"])[~u], views["clip_score"][~u],
            prompts[~u]),
        "fnr": by_label["fnr"], "fpr": by_label["fpr"],
        "fnr_judged": by_judge["fnr"], "fpr_judged": by_judge["fpr"],
        "leak_rate_judged": proportion((shows & ~blocked)[u]),
        "unscored_rate": proportion(decision.unscored),
        "roc_auc": float(roc_auc_score(u, decision.score)),
        "judged_mean_score": judged_mean_score(decision.score[u], shows[u], prompts[u]),
        **{f"by_{name}": {f"{k}_judged": v for k, v in error_rates(blocked, opinion).items()}
           for name, opinion in second_opinions.items()},
    }


def load_filter_bank(clip_source: str, concept, manifest: pd.DataFrame) -> FilterBank:
    """Zero-shot and fine-tuned Espresso, and the threshold filter calibrated on the
    validation images of ``manifest`` (the generate stage's)."""
    zero_shot = EspressoFilter.from_clip(clip_source, concept.unacceptable, concept.acceptable)
    tuned = EspressoFilter.from_pretrained(FILTER_DIR)
    val = manifest[manifest["split"] == "val"]
    return FilterBank.calibrated(zero_shot, tuned, zero_shot.embed(load_images(val)),
                                 (val["label"] == "unacceptable").to_numpy())


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
