"""DVC stage ``evaluate``: METHOD section 5 metrics on the test split, for every filter and every
prior CRT (METHOD section 8), each rate with its 95% interval over prompts (``pipeline.outcomes``
and ``pipeline.statistics``; the judge's leak rate is the primary effectiveness number).

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
from pipeline import outcomes, registry
from pipeline.params import mark_budget, run_stage, settings_of
from pipeline.schema import Params, Statistics
from pipeline.statistics import rate

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.espresso.baselines import Decision

REPORTS = Path("reports/evaluate")
NEEDS = {MANIFEST: "generate", FILTER_DIR: "finetune", EDITS_DIR: "edit"}


def run(params: Params) -> dict:
    import pandas as pd

    from pipeline.espresso.baselines import ADAPTABLE

    # the filter library keeps its own table (it imports nothing of the pipeline): checked here
    registry.implemented(registry.ADAPTABLE, ADAPTABLE, "pipeline.espresso.baselines.ADAPTABLE")

    from pipeline.espresso.metrics import clip_views
    from pipeline.judges import load_extra_judges, load_judge

    setting, concept, models = settings_of(params)
    manifest = pd.read_csv(MANIFEST)
    bank = load_filter_bank(models.clip, concept, manifest, params.filters)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    images, prompts = load_images(test), test["prompt"].tolist()
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
    for name in FILTERS:
        table[f"{name}_score"] = decisions[name].score
        table[f"{name}_blocked"] = decisions[name].blocked
    for crt in params.edit.crts:
        edited = load_edited_test_images(crt)
        edited_views = clip_views(bank.zero_shot, bank.zero_shot.embed(edited), prompts,
                                  edited.shape[1:])
        table[f"{crt}_p_eval"] = edited_views["p_eval"]
        table[f"{crt}_clip_score"] = edited_views["clip_score"]
        table[f"{crt}_judge_shows_concept"] = judge(edited)
    stats = params.statistics
    rates = outcomes.clean(table, stats)
    metrics = {name: {**rated(rates, name, stats),
                      **filter_extras(table, decisions[name], views["p_eval_black"],
                                      list(second_opinions), stats)}
               for name in FILTERS}
    for crt in params.edit.crts:
        metrics[crt] = {**rated(rates, crt, stats), **edit_extras(table, crt, stats)}
    metrics["safety_checker_cut"] = bank.safety_checker.cut
    # what the placeholder-scored CLIP accuracy gives a filter that blocks everything
    metrics["black_image_p_unacceptable"] = views["p_eval_black"]
    metrics["n_test_images"] = len(test)
    u = table[table["label"] == "unacceptable"]
    a = table[table["label"] == "acceptable"]
    metrics["judged_unacceptable_share"] = rate(u["judge_shows_concept"], u["prompt"], stats)
    metrics["judged_acceptable_share"] = rate(~a["judge_shows_concept"].to_numpy(bool),
                                              a["prompt"], stats)
    write_results(REPORTS, "evaluate", mark_budget(metrics, params))
    write_csv(REPORTS / "scores.csv", table)
    return metrics


def rated(rates: dict, crt: str, stats: Statistics) -> dict:
    """The CRT's clean outcomes (``pipeline.outcomes``), each with its interval over prompts."""
    return {metric: estimate.interval(stats.confidence)
            for (name, condition, metric), estimate in rates.items() if name == crt}


def filter_extras(table: pd.DataFrame, decision: Decision, p_black: float,
                  second_judges: list[str], stats: Statistics) -> dict:
    """A filter's numbers beyond the shared outcomes: error rates by prompt label, the
    placeholder and hard forms of CLIP accuracy (the release's), the judged mean score, ROC AUC,
    unscored images, and the error rates by each second judge."""
    from sklearn.metrics import roc_auc_score

    from pipeline.espresso.filter import blocks

    prompts = table["prompt"].to_numpy(object)
    blocked, score = decision.blocked, decision.score
    u = (table["label"] == "unacceptable").to_numpy()
    shows = table["judge_shows_concept"].to_numpy(bool)
    p_eval = table["p_eval"].to_numpy(float)

    def share(hits, where):
        return rate(np.asarray(hits, bool)[where], prompts[where], stats)

    out = {
        "clip_accuracy_hard": share(~blocked & blocks(p_eval - 0.5), u),
        "clip_accuracy_placeholder": rate(np.where(blocked, p_black, p_eval)[u], prompts[u], stats),
        "fnr": share(~blocked, u), "fpr": share(blocked, ~u),
        "fnr_judged": share(~blocked, shows),
        "unscored_rate": share(decision.unscored, np.ones_like(u)),
        "roc_auc": float(roc_auc_score(u, score)),
        "judged_mean_score": rate(score[u & shows], prompts[u & shows], stats),
    }
    for name in second_judges:
        opinion = table[f"{name}_shows_concept"].to_numpy(bool)
        out[f"by_{name}"] = {"fnr_judged": share(~blocked, opinion),
                             "fpr_judged": share(blocked, ~opinion)}
    return out


def edit_extras(table: pd.DataFrame, crt: str, stats: Statistics) -> dict:
    """An edit's images of acceptable prompts that the judge says show c_u (a side effect)."""
    a = table[table["label"] == "acceptable"]
    return {"judged_unacceptable_share_acceptable_prompts":
            rate(a[f"{crt}_judge_shows_concept"], a["prompt"], stats)}


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
