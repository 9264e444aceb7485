"""DVC stage ``evaluate``: METHOD section 5 metrics on the test split, for every filter and every
prior CRT (METHOD section 8), each rate with its 95% interval (``pipeline.espresso.metrics``).

Filters (``pipeline.espresso.baselines``): none; a prompt keyword blocklist; diffusers' SD
safety checker given the concept (cut calibrated on validation images); an MHSC-style linear
probe (fitted on training images); Espresso zero-shot; Espresso fine-tuned. They screen the
generate stage's test images. Fine-tuning CRTs (``edit``: ESD-x, ESD-u, UCE, CA) block nothing:
their own images of the same prompts and seeds are scored, CLIP accuracy is the plain
P_eval(u|x), and utility is the CLIP score of their acceptable images over the unedited model's.
CLIP accuracy and CLIP score always use the *original* CLIP; the judge (mini: the world's CNN,
paper: a different open_clip model) says what each image really shows.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.espresso.files import write_csv
from pipeline.espresso.filter_names import FILTERS
from pipeline.headline import write_results
from pipeline.outputs.edited import OUT as EDITS_DIR
from pipeline.outputs.edited import load_edited_test_images
from pipeline.outputs.filter_bank import load_filter_bank
from pipeline.outputs.finetuned import FILTER_DIR
from pipeline.outputs.generated import MANIFEST, load_images
from pipeline import registry
from pipeline.params import mark_budget, run_stage, settings_of
from pipeline.schema import Params

if TYPE_CHECKING:
    from pipeline.espresso.baselines import Decision

REPORTS = Path("reports/evaluate")
NEEDS = {MANIFEST: "generate", FILTER_DIR: "finetune", EDITS_DIR: "edit"}


def run(params: Params) -> dict:
    import pandas as pd

    from pipeline.espresso.baselines import ADAPTABLE

    # the filter library keeps its own table (it imports nothing of the pipeline): checked here
    registry.implemented(registry.ADAPTABLE, ADAPTABLE, "pipeline.espresso.baselines.ADAPTABLE")

    from pipeline.espresso.metrics import clip_views, proportion
    from pipeline.judges import load_extra_judges, load_judge

    setting, concept, models = settings_of(params)
    manifest = pd.read_csv(MANIFEST)
    bank = load_filter_bank(models.clip, concept, manifest, params.filters)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    images, prompts = load_images(test), test["prompt"].tolist()
    unacceptable = (test["label"] == "unacceptable").to_numpy()
    features = bank.zero_shot.embed(images)
    decisions = bank.decide(images, prompts)
    views = clip_views(bank.zero_shot, features, prompts, images.shape[1:])
    judge = load_judge(setting, models.judge, concept)
    shows = judge(images)
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
    for crt in params.edit.crts:
        edited = load_edited_test_images(crt)
        edited_views = clip_views(bank.zero_shot, bank.zero_shot.embed(edited), prompts,
                                  edited.shape[1:])
        edited_shows = judge(edited)
        metrics[crt] = edit_metrics(edited_views, views, prompts, unacceptable, edited_shows)
        table[f"{crt}_p_eval"] = edited_views["p_eval"]
        table[f"{crt}_clip_score"] = edited_views["clip_score"]
        table[f"{crt}_judge_shows_concept"] = edited_shows
    metrics["safety_checker_cut"] = bank.safety_checker.cut
    # what the placeholder-scored CLIP accuracy gives a filter that blocks everything
    metrics["black_image_p_unacceptable"] = views["p_eval_black"]
    metrics["n_test_images"] = len(test)
    metrics["judged_unacceptable_share"] = proportion(shows[unacceptable])
    metrics["judged_acceptable_share"] = proportion(~shows[~unacceptable])
    write_results(REPORTS, "evaluate", mark_budget(metrics, params))
    write_csv(REPORTS / "scores.csv", table)
    return metrics


def filter_metrics(decision: Decision, views: dict, prompts: list[str], unacceptable: np.ndarray,
                   shows: np.ndarray, second_opinions: dict[str, np.ndarray]) -> dict:
    """METHOD section 5 for one filter on the test split: effectiveness on unacceptable
    prompts, utility on acceptable prompts, FNR/FPR by prompt label and by judge(s)."""
    from sklearn.metrics import roc_auc_score

    from pipeline.espresso.metrics import (clip_accuracy, error_rates, judged_mean_score,
                                           normalized_clip_score, proportion)

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


def edit_metrics(edited: dict, unedited: dict, prompts: list[str], unacceptable: np.ndarray,
                 shows: np.ndarray) -> dict:
    """METHOD section 5 for a fine-tuning CRT: nothing is blocked, so CLIP accuracy is the plain
    P_eval(u|x) of its images of unacceptable prompts, and utility the CLIP score of its images
    of acceptable prompts over the unedited model's of the same prompt and seed."""
    from pipeline.espresso.metrics import clip_accuracy, normalized_clip_score, proportion

    prompts = np.asarray(prompts, object)
    u = unacceptable
    return {
        **clip_accuracy(edited["p_eval"][u], np.zeros(u.sum(), bool), prompts[u],
                        edited["p_eval_black"]),
        "normalized_clip_score": normalized_clip_score(edited["clip_score"][~u],
                                                       unedited["clip_score"][~u], prompts[~u]),
        "leak_rate_judged": proportion(shows[u]),
        "judged_unacceptable_share_acceptable_prompts": proportion(shows[~u]),
    }


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
