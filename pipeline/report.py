"""DVC stage ``report``: the current concept's results as a report a reviewer can read without
rerunning anything: ``reports/report/README.md`` (renders on a code host) and ``index.html``
(opens in a browser), with the metrics tables of evaluate / attack / certify, plots and image
grids of unfiltered vs Espresso-filtered outputs. Every concept removal technique (CRT) the
metrics hold gets a row: the filters of ``pipeline.espresso.filter_names.FILTERS`` and the fine-tuning CRTs
that the evaluate stage scored (its ``edit.crts``, read from the metrics, not from params).

In the paper setting, images of the unacceptable concept are real-world content (nudity,
violence, real people): they are blurred beyond recognition unless ``report.show_unacceptable``
is true. Mini-world images are shapes and are shown as they are.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.espresso.files import atomic_dir
from pipeline.espresso.filter_names import FILTERS
from pipeline.outputs.generated import MANIFEST, load_images
from pipeline.params import run_stage, settings_of
from pipeline.rendering import (CERTIFICATE_SCOPE, FILTER_NAMES, NOT_RESULTS, PLAIN_NOTE,
                                budget_of, cell, crts_of, render)
from pipeline.schema import Params

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from pipeline.schema import Statistics

OUT = Path("reports/report")
INPUTS = {stage: Path(f"reports/{stage}/detail.json")
          for stage in ("finetune", "evaluate", "everyday", "attack", "certify")}
SCORES = Path("reports/evaluate/scores.csv")
ATTACK_SCORES = Path("reports/attack/scores.csv")
CERTIFIED_ACCURACY = Path("reports/certify/certified_accuracy.csv")
NEEDS = {MANIFEST: "generate", **{path: stage for stage, path in INPUTS.items()},
         SCORES: "evaluate", ATTACK_SCORES: "attack", CERTIFIED_ACCURACY: "certify"}


def read_metrics() -> dict:
    missing = [str(p) for p in INPUTS.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing stage results {missing}: run `dvc repro` first")
    return {stage: json.loads(path.read_text()) for stage, path in INPUTS.items()}


def evaluation_tables(evaluate: dict) -> dict[str, pd.DataFrame]:
    """Effectiveness / utility of every CRT, then the error rates of the filters (a fine-tuning
    CRT blocks nothing, so it has none), each rate with its 95% interval."""
    import pandas as pd

    groups = {
        "Effectiveness and utility (test split)": (crts_of(evaluate), {
            "leak_rate_judged": "leak: shows c_u and reaches the user (judge) ↓",
            "normalized_clip_score": "norm. CLIP score ↑",
            "clip_accuracy": "CLIP acc. (paper's; circular for CLIP filters) ↓",
            "clip_accuracy_hard": "CLIP acc. (hard) ↓", "roc_auc": "ROC-AUC ↑"}),
        "Error rates of the filters (test split; by prompt label and by the judge)": (FILTERS, {
            "fnr": "FNR (label) ↓", "fpr": "FPR (label) ↓", "fnr_judged": "FNR (judge) ↓",
            "fpr_judged": "FPR (judge) ↓", "unscored_rate": "unscored ↓"}),
    }
    return {caption: pd.DataFrame({FILTER_NAMES[name]: {label: cell(evaluate[name].get(key))
                                                        for key, label in columns.items()}
                                   for name in names}).T
            for caption, (names, columns) in groups.items()}


def everyday_table(everyday: dict) -> pd.DataFrame:
    """Every CRT on prompts that name neither c_u nor c_a: what it blocks, what it costs in CLIP
    score, and what the judge says it passes of c_u."""
    import pandas as pd

    keys = {"blocked_share": "blocked ↓", "normalized_clip_score": "norm. CLIP score ↑",
            "judged_unacceptable_share": "passed showing c_u (judge)"}
    return pd.DataFrame({FILTER_NAMES[name]: {label: cell(everyday[name].get(key))
                                              for key, label in keys.items()}
                         for name in FILTER_NAMES if isinstance(everyday.get(name), dict)}).T


def attack_rates(stats: Statistics) -> dict:
    """Every attack outcome of this concept, clustered by the attack's prompts
    (``pipeline.outcomes.attacked`` on the attack stage's per-image scores)."""
    import pandas as pd

    from pipeline import outcomes

    return outcomes.attacked(pd.read_csv(ATTACK_SCORES), stats)


def attack_table(rates: dict, metric: str, confidence: float) -> pd.DataFrame:
    """CRTs x attack conditions for one attack metric, with 95% intervals: "X+" the run adapted
    to the row's CRT, "X" the plain run (filters only), worst+ the worst adapted one; '–' where
    a CRT was not attacked so."""
    import pandas as pd

    conditions = sorted({c for _, c, m in rates if m == metric},
                        key=lambda c: (not c.endswith("+"), c == "worst+", c))
    table = pd.DataFrame({condition: {FILTER_NAMES[crt]: cell(e.interval(confidence))
                                      for (crt, c, m), e in rates.items()
                                      if c == condition and m == metric}
                          for condition in conditions})
    return table.reindex([FILTER_NAMES[name] for name in FILTER_NAMES
                          if FILTER_NAMES[name] in table.index]).fillna("–")


def certify_table(certify: dict) -> pd.DataFrame:
    import pandas as pd

    keys = {"radius_normalized_50": "median radius (unit embedding)",
            "radius_median": "median radius (raw embedding)",
            "release_bound_median": "median release bound",
            "exact_over_release_median": "exact / release bound (median)"}
    table = pd.DataFrame({FILTER_NAMES[f]: {label: cell(certify[f][k]) for k, label in keys.items()}
                          for f in ("zero_shot", "espresso")})
    table.loc["certificate violations"] = [str(sum(certify[f]["violations"].values()))
                                           for f in ("zero_shot", "espresso")]
    for name in certify["espresso"]["attacks"]:
        table.loc[f"{name}: images moved beyond the radius"] = [
            cell(certify[f]["attacks"][name]["share_moved_beyond_radius"])
            for f in ("zero_shot", "espresso")]
    return table


def image_grids(folder: Path, blur: bool) -> dict[str, str]:
    """PNG grids: unacceptable test images before / after Espresso, acceptable after."""
    import pandas as pd
    from PIL import ImageFilter

    from pipeline.mini.quality import grid_image

    manifest = pd.read_csv(MANIFEST)
    scores = pd.read_csv(SCORES)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    images = load_images(test)
    grids = {}
    for label in ("unacceptable", "acceptable"):
        rows = np.flatnonzero((test["label"] == label).to_numpy())[:32]
        before = images[rows]
        after = np.where(scores["espresso_blocked"].to_numpy()[rows, None, None, None], 0, before)
        for when, batch in (("unfiltered", before), ("espresso", after)):
            grid = grid_image(batch, columns=16)
            if blur and label == "unacceptable":
                grid = grid.filter(ImageFilter.GaussianBlur(radius=grid.width // 40))
            name = f"{label}_{when}.png"
            grid.save(folder / name)
            grids[f"{label} prompts, {when.replace('espresso', 'after Espresso')}"] = name
    return grids


def figures(metrics: dict, rates: dict, confidence: float) -> dict[str, tuple[str, Figure]]:
    """Effectiveness/utility per CRT, attack success, certified accuracy (caption -> file name,
    figure; the results notebook shows the same figures); each titled ``NOT_RESULTS`` where the
    metrics are of a budget other than full."""
    import pandas as pd
    from matplotlib.figure import Figure  # no pyplot: no global backend, no open-figure state

    budget = budget_of(None, metrics)
    evaluate = metrics["evaluate"]
    crts = crts_of(evaluate)
    short = [FILTER_NAMES[name].split(" (")[0] for name in crts]
    out = {}
    fig = Figure(figsize=(max(7, 0.8 * len(crts)), 3.2))
    ax = fig.subplots()
    x = np.arange(len(crts))
    for offset, key, label in ((-0.2, "leak_rate_judged",
                                "leak on unacceptable prompts (judge; lower is better)"),
                               (0.2, "normalized_clip_score",
                                "normalised CLIP score on acceptable (higher is better)")):
        value, err = _bars([evaluate[name][key] for name in crts])
        ax.bar(x + offset, value, 0.4, yerr=err, capsize=2, label=label)
    ax.set_xticks(x, short, fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    out["Effectiveness and utility per CRT"] = "crts.png", _titled(fig, budget)
    conditions = sorted({c for _, c, m in rates if m == "attack_success" and c != "worst+"},
                        key=lambda c: (not c.endswith("+"), c))
    fig = Figure(figsize=(max(7, 1.4 * len(conditions)), 3.4))
    ax = fig.subplots()
    width = 0.8 / len(crts)
    missing = {"value": None, "low": None, "high": None}  # a CRT not attacked in a condition
    for i, name in enumerate(crts):
        value, err = _bars([rates[name, c, "attack_success"].interval(confidence)
                            if (name, c, "attack_success") in rates else missing
                            for c in conditions])
        ax.bar(np.arange(len(conditions)) + (i - (len(crts) - 1) / 2) * width, value, width,
               yerr=np.nan_to_num(err), capsize=1, label=short[i])
    ax.set_xticks(np.arange(len(conditions)), conditions, fontsize=7)
    ax.set_ylabel("attack success (judge)")
    ax.legend(fontsize=6, ncol=2)
    out["Attack success: images showing c_u that reach the user, by the judge (lower is "
        "better; X+: the run adapted to each CRT; X: plain, filters only)"] = (
        "attacks.png", _titled(fig, budget))
    curve = pd.read_csv(CERTIFIED_ACCURACY)
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    for f in ("zero_shot", "espresso"):
        ax.plot(curve["radius"], curve[f], label=FILTER_NAMES[f])
    ax.set_xlabel("radius r (unit image embedding)")
    ax.set_ylabel("blocked with radius >= r")
    ax.legend(fontsize=7)
    out["Certified accuracy on unacceptable test images"] = "certified.png", _titled(fig, budget)
    return out


def _bars(rates: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Bar heights and asymmetric error bars (95% intervals) of detail.json rates."""
    value = np.array([r["value"] for r in rates], float)  # None (no rate): NaN, no bar
    low = np.array([r["low"] if r["low"] is not None else r["value"] for r in rates], float)
    high = np.array([r["high"] if r["high"] is not None else r["value"] for r in rates], float)
    return value, np.vstack([value - low, high - value])


def _titled(fig: Figure, budget: str) -> Figure:
    if budget != "full":
        fig.suptitle(NOT_RESULTS.format(budget=budget).upper(), color="#b00020",
                     fontweight="bold", fontsize=11)
    fig.tight_layout()
    return fig


def plots(folder: Path, metrics: dict, rates: dict, confidence: float) -> dict[str, str]:
    """``figures`` saved into ``folder``: caption -> file name."""
    saved = {}
    for caption, (name, fig) in figures(metrics, rates, confidence).items():
        fig.savefig(folder / name, dpi=120)
        saved[caption] = name
    return saved


def run(params: Params) -> None:
    setting, concept, _ = settings_of(params)
    metrics = read_metrics()
    blur = setting == "paper" and not params.report.show_unacceptable
    intro = [f"Concept `{concept.name}` ({concept.kind.replace('_', ' ')}): "
             f"unacceptable \"{concept.unacceptable}\" vs acceptable \"{concept.acceptable}\". "
             f"Setting: {setting} ({'mini world, offline shapes' if setting == 'mini' else 'SD v1.4 + CLIP ViT-L/14'}).",
             f"Fine-tuning: checkpoint of epoch {metrics['finetune']['chosen_epoch']} chosen by "
             f"{metrics['finetune']['selection_rule']}.",
             f"Test images: {metrics['evaluate']['n_test_images']}; share of unacceptable-prompt "
             f"images that the independent judge says show the concept: "
             f"{cell(metrics['evaluate']['judged_unacceptable_share'])}. Every rate: value "
             "[95% interval] at the unit of sampling: a bootstrap over prompts (an attack's "
             "prompts), or the exact bound on the number of prompts where every prompt is all-0 "
             "or all-1 (docs/method.md section 5). The judge's leak and attack success come "
             "first; CLIP accuracy is the paper's metric, circular for the CLIP filters (it is "
             "the zero-shot filter's own score). A blocked output counts as not showing c_u and "
             "scores 0 in the CLIP score. A fine-tuning CRT blocks nothing: its rates are those "
             "of its edited model's images of the same prompts and seeds.", PLAIN_NOTE,
             f"The attacker chose its targets and candidates with its own eyes "
             f"({metrics['attack']['eyes']}), not with the judge ({metrics['attack']['judge']}).",
             CERTIFICATE_SCOPE]
    confidence = params.statistics.confidence
    rates = attack_rates(params.statistics)
    tables = {**evaluation_tables(metrics["evaluate"]),
              "Everyday prompts: naming neither c_u nor c_a (what a platform serves most)":
                  everyday_table(metrics["everyday"]),
              "Attack success (the judge sees c_u and the CRT let it through)":
                  attack_table(rates, "attack_success", confidence),
              "CLIP accuracy under attack (the paper's metric)":
                  attack_table(rates, "clip_accuracy", confidence),
              "Certified robustness": certify_table(metrics["certify"])}
    with atomic_dir(OUT) as tmp:
        pictures = {**plots(tmp, metrics, rates, confidence), **image_grids(tmp, blur)}
        markdown, page = render(f"Espresso report: {concept.name}", intro, tables, pictures,
                                first=[next(iter(tables))],  # the numbers first, then the prose
                                budget=budget_of(params, metrics))
        (tmp / "README.md").write_text(markdown)
        (tmp / "index.html").write_text(page)


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
