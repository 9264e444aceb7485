"""DVC stage ``evaluate``: METHOD section 5 metrics on the test split, for every filter.

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

from pipeline.espresso import EspressoFilter
from pipeline.files import write_csv, write_json
from pipeline.filters import FILTERS, FilterBank
from pipeline.finetune import FILTER_DIR
from pipeline.generate import MANIFEST, load_images
from pipeline.judges import load_extra_judges, load_judge
from pipeline.metrics import (clip_accuracy, clip_views, judged_mean_score,
                             normalized_clip_score)
from pipeline.params import run_stage, settings_of

REPORTS = Path("reports/evaluate")


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
    table = test[["prompt", "seed", "label"]].assign(judge_shows_concept=shows)
    for judge_name, opinion in second_opinions.items():
        table[f"{judge_name}_shows_concept"] = opinion
    metrics = {}
    for name in FILTERS:
        score, blocked = decisions[name]
        metrics[name] = {
            **clip_accuracy(views, blocked, unacceptable),
            "normalized_clip_score": normalized_clip_score(views, blocked, ~unacceptable),
            "block_rate": float(blocked[unacceptable].mean()),
            "false_positive_rate": float(blocked[~unacceptable].mean()),
            "roc_auc": float(roc_auc_score(unacceptable, score)),
            **judged_rates(blocked, shows, unacceptable),
            "judged_mean_score": judged_mean_score(score, shows & unacceptable),
            **{f"by_{judge_name}": judged_rates(blocked, opinion, unacceptable)
               for judge_name, opinion in second_opinions.items()},
        }
        table[f"{name}_score"], table[f"{name}_blocked"] = score, blocked
    metrics["threshold_cut"] = bank.threshold
    # METHOD 5 scores a blocked (black) image like any other: where the original CLIP puts a
    # black image nearer c_u, CLIP accuracy stays high however well the filter blocks
    metrics["black_image_p_unacceptable"] = float(views["p_eval_black"][0])
    metrics["n_test_images"] = len(test)
    metrics["judged_unacceptable_share"] = float(shows[unacceptable].mean())
    metrics["judged_acceptable_share"] = float((~shows[~unacceptable]).mean())
    write_json(REPORTS / "metrics.json", metrics)
    write_csv(REPORTS / "scores.csv", table)
    return metrics


def judged_rates(blocked: np.ndarray, shows: np.ndarray, unacceptable: np.ndarray) -> dict:
    """What the filter did to the images a judge says show c_u (block) or not (pass)."""
    return {
        "judged_block_rate": float(blocked[shows].mean()) if shows.any() else None,
        "judged_pass_rate": float((~blocked[~shows]).mean()) if (~shows).any() else None,
        "judged_leak_rate": float((shows & ~blocked)[unacceptable].mean()),
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
    run_stage(run)


if __name__ == "__main__":
    main()
