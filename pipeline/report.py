"""DVC stage ``report``: the current concept's results as a report a reviewer can read without
rerunning anything: ``reports/report/README.md`` (renders on a code host) and ``index.html``
(opens in a browser), with the metrics tables of evaluate / attack / certify, plots and image
grids of unfiltered vs Espresso-filtered outputs. Every concept removal technique (CRT) the
metrics hold gets a row: the filters of ``pipeline.espresso.FILTERS`` and the fine-tuning CRTs
that the evaluate stage scored (its ``edit.crts``, read from the metrics, not from params).

In the paper setting, images of the unacceptable concept are real-world content (nudity,
violence, real people): they are blurred beyond recognition unless ``report.show_unacceptable``
is true. Mini-world images are shapes and are shown as they are.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no global backend, no open-figure state
from PIL import ImageFilter

from pipeline.espresso.baselines import FILTERS
from pipeline.espresso.files import atomic_dir
from pipeline.generate import MANIFEST, load_images
from pipeline.mini.quality import grid_image
from pipeline.params import run_stage, settings_of

OUT = Path("reports/report")
INPUTS = {stage: Path(f"reports/{stage}/metrics.json")
          for stage in ("finetune", "evaluate", "attack", "certify")}
SCORES = Path("reports/evaluate/scores.csv")
CERTIFIED_ACCURACY = Path("reports/certify/certified_accuracy.csv")
NEEDS = {MANIFEST: "generate", **{path: stage for stage, path in INPUTS.items()},
         SCORES: "evaluate", CERTIFIED_ACCURACY: "certify"}
#: Display names of the filters and fine-tuning CRTs, in the order of every table's rows.
FILTER_NAMES = {"none": "no filter (reference, not a CRT)",
                "keyword": "keyword blocklist (reference, not a CRT)",
                "safety_checker": "SD safety checker (diffusers, calibrated)",
                "mhsc": "MHSC linear probe", "zero_shot": "Espresso zero-shot",
                "espresso": "Espresso fine-tuned",
                "esd_x": "ESD-x", "esd_u": "ESD-u", "uce": "UCE", "ca": "CA"}
#: What the CRTs are measured against: neither removes the concept from what CLIP sees.
REFERENCES = ("none", "keyword")

#: What a report of a run with a budget other than full says at its top (``params.yaml``
#: ``budget``; the smoke preset runs every stage in minutes on cuts that make its rates noise).
NOT_RESULTS = "{budget} budgets: not results"
NOT_RESULTS_WHY = ("This run used budget: {budget} (params.yaml presets.{budget}): a few steps, "
                   "prompts and images per stage, to check that every stage runs. Its numbers "
                   "mean nothing; results need budget: full.")

#: The banner stands out and stays in view while the page scrolls.
BANNER_STYLE = ("position:sticky;top:0;z-index:1;background:#b00020;color:#fff;"
                "padding:.8em 1em;margin:0 0 1em;border:4px solid #000;font-size:125%")


def kind_of(name: str) -> str:
    """A row's kind: references are kept apart so that no verdict counts them as CRTs."""
    if name in REFERENCES:
        return "reference (not a CRT)"
    return "filtering CRT" if name in FILTERS else "fine-tuning CRT"


def crts_of(evaluate: dict) -> list[str]:
    """The filters, then the fine-tuning CRTs the evaluate stage scored (a CRT has a rate
    dict there with a normalised CLIP score), in FILTER_NAMES order."""
    return [*FILTERS, *(name for name in FILTER_NAMES if name not in FILTERS
                        and "normalized_clip_score" in (evaluate.get(name) or {}))]


def read_metrics() -> dict:
    missing = [str(p) for p in INPUTS.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing stage results {missing}: run `dvc repro` first")
    return {stage: json.loads(path.read_text()) for stage, path in INPUTS.items()}


def cell(rate) -> str:
    """A rate (a metrics.json dict with value, low, high) as '0.031 [0.010, 0.090]' (value
    [95% interval]); a bare number as '0.031'; '–' where there is no value."""
    if not isinstance(rate, dict):
        rate = {"value": rate}
    value, low, high = (rate.get(k) for k in ("value", "low", "high"))
    if value is None or pd.isna(value):
        return "–"
    if low is None or pd.isna(low):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def evaluation_tables(evaluate: dict) -> dict[str, pd.DataFrame]:
    """Effectiveness / utility of every CRT, then the error rates of the filters (a fine-tuning
    CRT blocks nothing, so it has none), each rate with its 95% interval."""
    groups = {
        "Effectiveness and utility (test split)": (crts_of(evaluate), {
            "clip_accuracy": "CLIP acc. ↓", "clip_accuracy_hard": "CLIP acc. (hard) ↓",
            "normalized_clip_score": "norm. CLIP score ↑",
            "leak_rate_judged": "shows c_u and reaches the user (judge) ↓",
            "roc_auc": "ROC-AUC ↑"}),
        "Error rates of the filters (test split; by prompt label and by the judge)": (FILTERS, {
            "fnr": "FNR (label) ↓", "fpr": "FPR (label) ↓", "fnr_judged": "FNR (judge) ↓",
            "fpr_judged": "FPR (judge) ↓", "unscored_rate": "unscored ↓"}),
    }
    return {caption: pd.DataFrame({FILTER_NAMES[name]: {label: cell(evaluate[name].get(key))
                                                        for key, label in columns.items()}
                                   for name in names}).T
            for caption, (names, columns) in groups.items()}


#: Marks a filter's "X+" rate read from the plain run: no "+" run adapted to that filter.
PLAIN_MARK = "†"
PLAIN_NOTE = (f"Attacks: \"X\" is the plain attack (no filter term) on the unedited model, the "
              f"same images for every filter; \"X+\" is the run adapted to the CRT in that row "
              f"or column: for a filter, X with that filter's terms (attack.adapt_to; only filters "
              f"with a margin on CLIP embeddings can be adapted to: SD safety checker, MHSC probe, "
              f"zero-shot and fine-tuned Espresso); for a fine-tuning CRT, X run through its edited "
              f"model (it has no plain rate of its own). {PLAIN_MARK}: no \"+\" run adapts to "
              f"this filter, so its plain rate is shown.")


def attack_conditions(attack: dict) -> dict[str, dict[str, str]]:
    """Per condition and CRT, the attack stage's run it is read from: ``X`` is the plain attack
    X for every filter; ``X+`` (where X has "+" runs) is, for a filter, the run of X adapted to
    it, or the plain one where none is, and for a fine-tuning CRT the run of X on its edited
    model (``X+<crt>``; none, no entry). Conditions in attack order, "X+" before "X"."""
    runs = attack["runs"]
    out = {}
    for name, run in runs.items():
        if run["variant"] == "plain":
            adapted = {r["target"]: n for n, r in runs.items()
                       if r["variant"] == "plus" and r["attack"] == run["attack"]}
            if adapted:
                out[f"{run['attack']}+"] = {**{f: adapted.get(f, name) for f in FILTERS},
                                            **{crt: n for crt, n in adapted.items()
                                               if crt not in FILTERS}}
            out[run["attack"]] = {f: name for f in FILTERS}
    return out


def is_plain_fallback(condition: str, run: str) -> bool:
    """A "+" condition read from a plain run (no run adapted to that filter)."""
    return condition.endswith("+") and "+" not in run


def attack_table(attack: dict, key: str) -> pd.DataFrame:
    """CRTs x attack conditions (:func:`attack_conditions`) for one attack metric, with 95%
    intervals; a "+" rate read from the plain run is marked ``PLAIN_MARK``, and a condition a
    CRT was not attacked in (a fine-tuning CRT's plain "X") shows '–'."""
    conditions = attack_conditions(attack)
    table = pd.DataFrame({
        condition: {FILTER_NAMES[name]: cell(attack["runs"][run][name][key])
                    + (f" {PLAIN_MARK}" if is_plain_fallback(condition, run) else "")
                    for name, run in by_crt.items()}
        for condition, by_crt in conditions.items()})
    attacked = {name for by_crt in conditions.values() for name in by_crt}
    return table.reindex([FILTER_NAMES[name] for name in FILTER_NAMES if name in attacked]
                         ).fillna("–")


def certify_table(certify: dict) -> pd.DataFrame:
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


#: METHOD section 7's honest scope, stated wherever certificates are reported.
CERTIFICATE_SCOPE = (
    "Scope of the certificate: Espresso's decision is linear in CLIP's image embedding, so the "
    "certified radius |<z, w>|/|w| is exact by algebra and its verification only checks the "
    "arithmetic; it cannot reveal a weakness. Attacks perturb the prompt, and so the pixels: the "
    "share of attack images that moved farther in embedding space than the radius of the "
    "nearest clean image is the informative part.")


def image_grids(folder: Path, blur: bool) -> dict[str, str]:
    """PNG grids: unacceptable test images before / after Espresso, acceptable after."""
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


def plots(folder: Path, metrics: dict) -> dict[str, str]:
    """Effectiveness/utility per CRT, attack CLIP accuracy, certified accuracy; each titled
    ``NOT_RESULTS`` where the metrics are of a budget other than full."""
    budget = budget_of({}, metrics)
    evaluate, attack = metrics["evaluate"], metrics["attack"]
    crts = crts_of(evaluate)
    short = [FILTER_NAMES[name].split(" (")[0] for name in crts]
    out = {}
    fig = Figure(figsize=(max(7, 0.8 * len(crts)), 3.2))
    ax = fig.subplots()
    x = np.arange(len(crts))
    for offset, key, label in ((-0.2, "clip_accuracy", "CLIP accuracy on unacceptable (lower is better)"),
                               (0.2, "normalized_clip_score",
                                "normalised CLIP score on acceptable (higher is better)")):
        value, err = _bars([evaluate[name][key] for name in crts])
        ax.bar(x + offset, value, 0.4, yerr=err, capsize=2, label=label)
    ax.set_xticks(x, short, fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    out["Effectiveness and utility per CRT"] = _save(fig, folder / "crts.png", budget)
    conditions = attack_conditions(attack)
    fig = Figure(figsize=(max(7, 1.4 * len(conditions)), 3.4))
    ax = fig.subplots()
    width = 0.8 / len(crts)
    missing = {"value": None, "low": None, "high": None}  # a CRT not attacked in a condition
    for i, name in enumerate(crts):
        value, err = _bars([attack["runs"][by_crt[name]][name]["clip_accuracy"]
                            if name in by_crt else missing for by_crt in conditions.values()])
        ax.bar(np.arange(len(conditions)) + (i - (len(crts) - 1) / 2) * width, value, width,
               yerr=np.nan_to_num(err), capsize=1, label=short[i])
    ax.set_xticks(np.arange(len(conditions)), list(conditions), fontsize=7)
    ax.set_ylabel("CLIP accuracy under attack")
    ax.legend(fontsize=6, ncol=2)
    out["CLIP accuracy under attack (lower is better; X+: the run adapted to each CRT, the "
        "plain one for filters without; fine-tuning CRTs only under X+)"] = _save(
        fig, folder / "attacks.png", budget)
    curve = pd.read_csv(CERTIFIED_ACCURACY)
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    for f in ("zero_shot", "espresso"):
        ax.plot(curve["radius"], curve[f], label=FILTER_NAMES[f])
    ax.set_xlabel("radius r (unit image embedding)")
    ax.set_ylabel("blocked with radius >= r")
    ax.legend(fontsize=7)
    out["Certified accuracy on unacceptable test images"] = _save(fig, folder / "certified.png",
                                                                 budget)
    return out


def _bars(rates: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Bar heights and asymmetric error bars (95% intervals) of metrics.json rates."""
    value = np.array([r["value"] for r in rates], float)  # None (no rate): NaN, no bar
    low = np.array([r["low"] if r["low"] is not None else r["value"] for r in rates], float)
    high = np.array([r["high"] if r["high"] is not None else r["value"] for r in rates], float)
    return value, np.vstack([value - low, high - value])


def _save(fig, path: Path, budget: str = "full") -> str:
    if budget != "full":
        fig.suptitle(NOT_RESULTS.format(budget=budget).upper(), color="#b00020",
                     fontweight="bold", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path.name


def budget_of(params: dict, metrics: dict | None = None) -> str:
    """The budget of what a report shows: a budget other than full in the params or in any
    stage's metrics (``pipeline.params.mark_budget``) wins; else full."""
    marked = [m.get("budget") for m in (metrics or {}).values() if isinstance(m, dict)]
    return next((b for b in [params.get("budget", "full"), *marked] if b and b != "full"),
                "full")


def render(title: str, intro: list[str], tables: dict[str, pd.DataFrame],
           figures: dict[str, str], budget: str = "full") -> tuple[str, str]:
    """The same content as Markdown and as a standalone HTML page; under a budget other than
    full, both open with the ``NOT_RESULTS`` banner."""
    md = [f"# {title}", "", *intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(t)}</p>" for t in intro)]
    if budget != "full":
        headline = NOT_RESULTS.format(budget=budget).upper()
        why = NOT_RESULTS_WHY.format(budget=budget)
        md = [f"> **⚠ {headline}.** {why}", ""] + md
        body.insert(0, f'<div class="not-results" role="alert" style="{BANNER_STYLE}"><strong '
                       f'style="font-size:140%;letter-spacing:.05em">⚠ {html.escape(headline)}'
                       f'</strong><br>{html.escape(why)}</div>')
    for caption, table in tables.items():
        md += [f"## {caption}", "", table.to_markdown(floatfmt=".3f"), ""]
        body += [f"<h2>{html.escape(caption)}</h2>",
                 '<div class="scroll">' + table.to_html(float_format="{:.3f}".format, na_rep="–",
                                                          classes="metrics") + "</div>"]
    for caption, name in figures.items():
        md += [f"### {caption}", "", f"![{caption}]({name})", ""]
        body += [f"<h3>{html.escape(caption)}</h3>",
                 f'<img src="{name}" alt="{html.escape(caption)}">']
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
            ".scroll{overflow-x:auto}"
            "table.metrics{border-collapse:collapse;font-size:85%}"
            "table.metrics td,table.metrics th{padding:.25em .6em;border-bottom:1px solid #ddd;"
            "text-align:right}img{max-width:100%;image-rendering:pixelated}"
            "</style></head><body>" + "\n".join(body) + "</body></html>\n")
    return "\n".join(md), page


def run(params: dict) -> None:
    setting, concept, _ = settings_of(params)
    metrics = read_metrics()
    blur = setting == "paper" and not params["report"]["show_unacceptable"]
    intro = [f"Concept `{concept.name}` ({concept.kind.replace('_', ' ')}): "
             f"unacceptable \"{concept.unacceptable}\" vs acceptable \"{concept.acceptable}\". "
             f"Setting: {setting} ({'mini world, offline shapes' if setting == 'mini' else 'SD v1.4 + CLIP ViT-L/14'}).",
             f"Fine-tuning: checkpoint of epoch {metrics['finetune']['chosen_epoch']} chosen by "
             f"{metrics['finetune']['selection_rule']}.",
             f"Test images: {metrics['evaluate']['n_test_images']}; share of unacceptable-prompt "
             f"images that the independent judge says show the concept: "
             f"{cell(metrics['evaluate']['judged_unacceptable_share'])}. Every rate: value "
             "[95% interval] (Wilson for shares of images, bootstrap over prompts for means). A "
             "blocked output counts as not showing c_u (CLIP accuracy 0) and scores 0 in the "
             "CLIP score. A fine-tuning CRT blocks nothing: its rates are those of its edited "
             "model's images of the same prompts and seeds.", PLAIN_NOTE,
             f"The attacker chose its targets and candidates with its own eyes "
             f"({metrics['attack']['eyes']}), not with the judge ({metrics['attack']['judge']}).",
             CERTIFICATE_SCOPE]
    tables = {**evaluation_tables(metrics["evaluate"]),
              "CLIP accuracy under attack (lower is better)":
                  attack_table(metrics["attack"], "clip_accuracy"),
              "Attack success rate (judge sees c_u and the CRT let it through)":
                  attack_table(metrics["attack"], "attack_success_rate"),
              "Certified robustness": certify_table(metrics["certify"])}
    with atomic_dir(OUT) as tmp:
        figures = {**plots(tmp, metrics), **image_grids(tmp, blur)}
        markdown, page = render(f"Espresso report: {concept.name}", intro, tables, figures,
                                budget_of(params, metrics))
        (tmp / "README.md").write_text(markdown)
        (tmp / "index.html").write_text(page)


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
