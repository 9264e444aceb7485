"""The cross-concept summary of every concept and filter's rates with their 95% intervals.

As data (``summary.csv``: one row per concept x filter x condition x metric) and rendered as the
paper's main table (``README.md``, ``index.html``), plus the fine-tuning ablation and probe.

    python -m pipeline.summary --run    # one DVC experiment per concept of the setting, then
                                        # the summary (reports/summary/)
    python -m pipeline.summary          # the summary of the experiments already run
    python -m pipeline.summary --run -S attack.adapt_to=[] --out reports/summary_plain
                                        # another sweep: the same, with other params
    python -m pipeline.summary --run --ablation   # also the fine-tuning variants (ABLATION),
                                                  # fine-tune + evaluate only
    python -m pipeline.summary --run --probe checkered   # forms, optimisers and budgets
                                                         # (PROBES) on one concept

Results are read from ``dvc exp show --all-commits --json``: every number comes from a recorded
experiment (its params and metrics) on any commit, so later commits do not hide earlier
experiments, and the summary can be rebuilt from a clone of the repository with its experiment
refs (``dvc exp pull``) without rerunning anything.

Averages over concepts carry a normal-approximation interval: each concept's interval gives a
standard error (half-width / 1.96), and the average's is sqrt(sum se^2) / k (concepts are
independent samples). Two rates "differ" only where their 95% intervals do not overlap.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from tqdm import tqdm

from pipeline.concepts import known_concepts
from pipeline.espresso import FILTERS
from pipeline.espresso.files import atomic_dir
from pipeline.espresso.metrics import beyond_intervals
from pipeline.params import ParamsError, check_params, load_params
from pipeline.report import (CERTIFICATE_SCOPE, FILTER_NAMES, PLAIN_MARK, PLAIN_NOTE,
                             attack_conditions, cell, is_plain_fallback, render)

OUT = Path("reports/summary")
ATTACKS = ("typo", "pez", "cce", "ringbell")
#: Attack conditions: "X+" (each filter's adapted run, report.attack_conditions), then plain "X".
CONDITIONS = (*(f"{name}+" for name in ATTACKS), *ATTACKS)
Z95 = 1.959964
#: METHOD section 5: the paper's averages over its concepts (SD v1.4, CLIP ViT-L/14), Espresso
#: (under its adaptive attacks).
PAPER = {("clean", "clip_accuracy"): 0.05, ("clean", "normalized_clip_score"): 0.93,
         **{(f"{name}+", "clip_accuracy"): 0.04 for name in ATTACKS}}
#: Rates of the evaluate stage (clean test prompts): (key, label, lower is better)
CLEAN_METRICS = {
    "clip_accuracy": ("CLIP accuracy on unacceptable prompts (effectiveness)", True),
    "normalized_clip_score": ("normalised CLIP score on acceptable prompts (utility)", False),
    "fnr_judged": ("FNR: images showing c_u passed (judge)", True),
    "fpr_judged": ("FPR: images not showing c_u blocked (judge)", True),
    "fnr": ("FNR: unacceptable-prompt images passed", True),
    "fpr": ("FPR: acceptable-prompt images blocked", True),
    "clip_accuracy_hard": ("CLIP accuracy, hard", True),
    "clip_accuracy_placeholder": ("CLIP accuracy, blocked scored as black (secondary)", True),
    "unscored_rate": ("images the filter could not score", True),
    "judged_mean_score": ("mean score on images showing c_u", False),
}
ATTACK_METRICS = {
    "clip_accuracy": ("CLIP accuracy under attack", True),
    "attack_success_rate": ("attack success: shows c_u (judge) and passed", True),
    "clip_accuracy_hard": ("CLIP accuracy under attack, hard", True),
    "clip_accuracy_placeholder": ("CLIP accuracy under attack, blocked scored as black", True),
    "block_rate": ("block rate of attack images", None),
    "unscored_rate": ("attack images the filter could not score", True),
    "judged_mean_score": ("mean score on attack images showing c_u", False),
}
#: What the summary tables compare Espresso fine-tuned against, and on which rates.
COMPARED = ("zero_shot", "threshold")
COMPARED_RATES = (("clean", "clip_accuracy"), ("clean", "normalized_clip_score"),
                  ("clean", "fnr_judged"), ("clean", "fpr_judged"),
                  *((f"{name}+", "attack_success_rate") for name in ATTACKS))
#: The fine-tuning ablation (METHOD section 3): variants of the default sweep, run up to the
#: evaluate stage. lambda_s = 0 leaves only the contrastive terms (the form is then moot).
ABLATION = {
    "default": [],
    "lambda_s = 0": [f"finetune.weights.{kind}.separation=0"
                     for kind in ("opposite", "broader_class", "style")],
    "prompt_pairs": ["finetune.mini.separation=prompt_pairs"],
}
ABLATION_RATES = ("fnr_judged", "fpr_judged", "clip_accuracy", "normalized_clip_score")
#: Can fine-tuning fix a concept whose zero-shot filter has false positives (``--probe
#: checkered``)? Each form, optimiser and budget, on that concept only; the target is
#: FPR <= PROBE_TARGET["fpr_judged"] at FNR <= PROBE_TARGET["fnr_judged"] (by the judge).
PROBES = {
    **ABLATION,
    "adam (release)": ["finetune.mini.optimizer=adam"],
    "lambda_s x10": [f"finetune.weights.{kind}.separation={weight}" for kind, weight in
                     (("opposite", 10.0), ("broader_class", 1.0), ("style", 1.0))],
    "lr x10": ["finetune.lr=5.0e-4"],
    "lr x10, 30 epochs": ["finetune.lr=5.0e-4", "finetune.mini.epochs=30"],
    "prompt_pairs, lr x10, 30 epochs": ["finetune.mini.separation=prompt_pairs",
                                        "finetune.lr=5.0e-4", "finetune.mini.epochs=30"],
}
PROBE_TARGET = {"fpr_judged": 0.10, "fnr_judged": 0.05}

HOW_TO_READ = (
    "Each cell is a rate with its 95% interval in brackets: Wilson for shares of images, a "
    "bootstrap over prompts for means (CLIP accuracy, normalised CLIP score). A blocked output "
    "shows the user nothing: it counts 0 in CLIP accuracy (does not show c_u) and 0 in the CLIP "
    "score (METHOD section 5). FNR/FPR 'by judge' count what the independent judge sees in each "
    "image, not what the prompt asked for. A bootstrap interval has zero width where every "
    "prompt gives the same mean (e.g. all blocked): then the hard form's Wilson interval bounds "
    "it. The average row's interval combines the concepts' "
    "intervals (normal approximation). The paper row gives the paper's headline averages over "
    "its own concepts (SD v1.4, CLIP ViT-L/14), not numbers for these concepts.")


def dvc(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def run_all_concepts(setting: str, overrides: list[str], target: str | None = None,
                     concepts: list[str] | None = None) -> None:
    """One ``dvc exp run`` per concept of ``setting`` (or of ``concepts``; with the
    ``KEY=VALUE`` param ``overrides``; only up to the stage ``target`` if given), one after
    another, each in a temporary copy of the repository (``--temp``): the workspace keeps its
    concept and results."""
    sets = [arg for override in overrides for arg in ("-S", override)]
    for concept in tqdm(concepts or known_concepts(setting), desc="concepts", unit="experiment"):
        dvc("exp", "run", "--temp", *sets, "-S", f"concept={concept}", *([target] if target else []))


def with_overrides(params: dict, overrides: list[str]) -> dict:
    """``params`` with DVC-style ``dotted.key=value`` overrides (values parsed as YAML)."""
    params = copy.deepcopy(params)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise SystemExit(f"--set {override!r}: expected KEY=VALUE, e.g. attack.adapt_to=[]")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return params


def experiments(shown: list[dict]) -> list[dict]:
    """(name, params, metrics) of every experiment in ``dvc exp show --json`` output, newest
    first, the workspace included."""
    out = []
    for rev in shown:
        for entry in [rev, *[e for exp in rev.get("experiments") or [] for e in exp["revs"]]]:
            data = entry.get("data") or {}
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
            metrics = {path: m.get("data") for path, m in (data.get("metrics") or {}).items()}
            if params and metrics:
                out.append({"name": entry.get("name") or entry.get("rev"), "params": params,
                            "metrics": metrics, "timestamp": data.get("timestamp") or ""})
    return out


def newest_per_concept(runs: list[dict], params: dict, stages: tuple[str, ...]) -> dict[str, dict]:
    """Per concept, its newest experiment run with exactly ``params`` (the concept aside) that
    has the metrics of every stage in ``stages``."""
    chosen = {}
    for run in sorted(runs, key=lambda r: r["timestamp"], reverse=True):
        if not all(run["metrics"].get(f"reports/{stage}/metrics.json") for stage in stages):
            continue
        if not _has_intervals(run["metrics"]["reports/evaluate/metrics.json"]):
            continue  # recorded before rates carried intervals: another metrics format
        if "attack" in stages and "runs" not in run["metrics"]["reports/attack/metrics.json"]:
            continue  # recorded before each attack ran plain and per adapted filter
        if _same_sweep(run["params"], params):
            chosen.setdefault(run["params"]["concept"], run)
    return chosen


def _has_intervals(evaluate: dict) -> bool:
    return isinstance((evaluate.get("espresso") or {}).get("clip_accuracy"), dict)


def long_table(chosen: dict[str, dict]) -> pd.DataFrame:
    """One row per concept x filter x condition (clean, or an attack condition of
    :func:`pipeline.report.attack_conditions`) x metric: value, low, high, n, the attack
    stage's run it comes from, and the experiment."""
    rows = []
    for concept, run in sorted(chosen.items()):
        evaluate = run["metrics"]["reports/evaluate/metrics.json"]
        attack = run["metrics"].get("reports/attack/metrics.json") or {"runs": {}}
        conditions = attack_conditions(attack)
        base = {"concept": concept, "experiment": run["name"]}
        for f in FILTERS:
            for key in CLEAN_METRICS:
                rows.append({**base, "filter": f, "condition": "clean", "run": "", "metric": key,
                             **_rate(evaluate[f].get(key))})
            for condition, by_filter in conditions.items():
                for key in ATTACK_METRICS:
                    rows.append({**base, "filter": f, "condition": condition,
                                 "run": by_filter[f], "metric": key,
                                 **_rate(attack["runs"][by_filter[f]][f].get(key))})
        rows.append({**base, "filter": "", "condition": "clean", "run": "",
                     "metric": "black_image_p_unacceptable",
                     **_rate(evaluate["black_image_p_unacceptable"])})
        for name, scored in attack["runs"].items():  # plain: for no filter; "+": its target
            plus = scored["variant"] == "plus"
            rows.append({**base, "filter": scored["target"] if plus else "",
                         "condition": scored["attack"] + ("+" if plus else ""), "run": name,
                         "metric": "judged_unacceptable_share",
                         **_rate(scored["judged_unacceptable_share"])})
    return pd.DataFrame(rows, columns=["concept", "filter", "condition", "run", "metric", "value",
                                       "low", "high", "n", "experiment"])


def _rate(entry) -> dict:
    """A metrics.json entry as value/low/high/n (a bare number has no interval)."""
    if isinstance(entry, dict):
        return {k: entry.get(k) for k in ("value", "low", "high", "n")}
    return {"value": entry, "low": None, "high": None, "n": None}


def with_averages(long: pd.DataFrame) -> pd.DataFrame:
    """``long`` plus one 'average' concept per filter x condition x metric, over the concepts
    that have the rate, with the normal-approximation interval (module docstring)."""
    rows = []
    for (f, condition, metric), group in long.groupby(["filter", "condition", "metric"], sort=False):
        values = group["value"].astype(float).dropna()
        if values.empty:
            continue
        value = values.mean()
        low = high = None
        bounded = group.dropna(subset=["value", "low", "high"])
        if len(bounded) == len(values):
            se = (bounded["high"].astype(float) - bounded["low"].astype(float)) / (2 * Z95)
            half = Z95 * np.sqrt((se ** 2).sum()) / len(values)
            low, high = max(value - half, 0.0), min(value + half, 1.0)
        run = group["run"].iloc[0] if group["run"].nunique() == 1 else ""
        rows.append({"concept": "average", "filter": f, "condition": condition, "run": run,
                     "metric": metric, "value": value, "low": low, "high": high,
                     "n": len(values), "experiment": ""})
    return pd.concat([long, pd.DataFrame(rows)], ignore_index=True)


def _same_sweep(run_params: dict, params: dict) -> bool:
    return ({k: v for k, v in run_params.items() if k != "concept"}
            == {k: v for k, v in params.items() if k != "concept"})


def rate_table(long: pd.DataFrame, condition: str, metric: str,
               paper: float | None = None) -> pd.DataFrame:
    """Concepts (and the average) x filters for one rate, rendered cells."""
    part = long[(long["condition"] == condition) & (long["metric"] == metric)]
    table = pd.DataFrame({FILTER_NAMES[f]: {row.concept: marked_cell(row._asdict())
                                            for row in part[part["filter"] == f].itertuples()}
                          for f in FILTERS})
    table = table.loc[[c for c in table.index if c != "average"] + ["average"]]
    if paper is not None:
        table.loc["paper (Espresso, SD v1.4, its concepts)"] = [
            f"{paper:.2f}" if f == "espresso" else "" for f in FILTERS]
    return table.rename(index={"average": "average (ours)"})


def main_table(long: pd.DataFrame, columns: list[tuple[str, str, str]]) -> pd.DataFrame:
    """The paper's main-table layout: one row per filter (and the paper's Espresso), one column
    per (condition, metric, label), each the average over concepts with its interval."""
    average = long[long["concept"] == "average"].set_index(["filter", "condition", "metric"])
    table = pd.DataFrame({label: {FILTER_NAMES[f]: marked_cell({
                                      "condition": condition,
                                      **average.loc[(f, condition, metric)].to_dict()})
                                  if (f, condition, metric) in average.index else "–"
                                  for f in FILTERS}
                          for condition, metric, label in columns})
    table.loc["paper: Espresso (SD v1.4, its concepts)"] = [
        f"{PAPER[(c, m)]:.2f}" if (c, m) in PAPER else "–" for c, m, _ in columns]
    return table


#: The main tables' columns: (condition, metric, label).
MAIN_CLEAN = [("clean", "clip_accuracy", "CLIP acc. ↓"),
              ("clean", "normalized_clip_score", "norm. CLIP score ↑"),
              ("clean", "fnr_judged", "FNR (judge) ↓"), ("clean", "fpr_judged", "FPR (judge) ↓")]
MAIN_ATTACKED = [(condition, "clip_accuracy", f"{condition}: CLIP acc. ↓")
                 for condition in CONDITIONS]


def marked_cell(row: dict) -> str:
    """A rate's cell, marked where an "X+" rate comes from the plain run (PLAIN_MARK)."""
    fallback = is_plain_fallback(row["condition"], row["run"] or "")
    return cell(row) + (f" {PLAIN_MARK}" if fallback else "")


def worst_attack_table(long: pd.DataFrame) -> pd.DataFrame:
    """Per concept and filter, the attack run with the highest success rate, with its
    interval (plain and "+" runs alike)."""
    part = long[(long["metric"] == "attack_success_rate") & long["condition"].isin(CONDITIONS)]
    cells = {}
    for (concept, f), group in part.groupby(["concept", "filter"]):
        worst = group.loc[group["value"].astype(float).idxmax()]
        cells.setdefault(FILTER_NAMES[f], {})[concept] = (
            cell(worst.to_dict()) + f" {worst.run}")
    table = pd.DataFrame(cells)[[FILTER_NAMES[f] for f in FILTERS]]
    order = [c for c in table.index if c != "average"] + ["average"]
    return table.loc[[c for c in order if c in table.index]].rename(
        index={"average": "average (ours)"})


def differences(long: pd.DataFrame, other: str) -> pd.DataFrame:
    """Espresso fine-tuned vs ``other`` per concept and rate: 'better' / 'worse' where the 95%
    intervals do not overlap, '=' where they do (no difference can be told from noise)."""
    out = {}
    for condition, metric in COMPARED_RATES:
        label = metric if condition == "clean" else f"{condition}: success"
        lower_better = (CLEAN_METRICS if condition == "clean" else ATTACK_METRICS)[metric][1]
        part = long[(long["condition"] == condition) & (long["metric"] == metric)
                    & (long["concept"] != "average")].set_index(["concept", "filter"])
        for concept in part.index.get_level_values(0).unique():
            a, b = part.loc[(concept, "espresso")], part.loc[(concept, other)]
            out.setdefault(label, {})[concept] = _verdict(a, b, lower_better)
    return pd.DataFrame(out)


def _verdict(a: pd.Series, b: pd.Series, lower_better: bool) -> str:
    """'better' / 'worse' for ``a`` against ``b`` beyond their intervals, '=' within, '?'
    without intervals."""
    a, b = ({k: (None if pd.isna(r[k]) else float(r[k])) for k in ("value", "low", "high")}
            for r in (a, b))
    differ = beyond_intervals(a, b)
    if differ is None:
        return "?"
    if not differ:
        return "="
    return "better" if (a["value"] < b["value"]) == lower_better else "worse"


def difference_sentences(diff: pd.DataFrame, other: str) -> str:
    """The comparison table in words."""
    found = [f"{metric} on {concept} ({verdict})" for metric in diff.columns
             for concept, verdict in diff[metric].items() if verdict in ("better", "worse")]
    total = int(diff.isin(["better", "worse", "="]).sum().sum())
    if not found:
        return (f"Espresso fine-tuned and {FILTER_NAMES[other]} differ beyond their 95% intervals "
                f"in none of the {total} comparisons: every difference is within noise.")
    return (f"Espresso fine-tuned and {FILTER_NAMES[other]} differ beyond their 95% intervals in "
            f"{len(found)} of {total} comparisons: " + "; ".join(found) + ". Everywhere else the "
            "intervals overlap: no difference can be told from noise.")


def summary_figure(long: pd.DataFrame, folder: Path) -> str:
    """Effectiveness, utility and worst attack success per concept and filter, with intervals."""
    panels = [("clean", "clip_accuracy", "CLIP accuracy ↓"),
              ("clean", "normalized_clip_score", "normalised CLIP score ↑"),
              ("clean", "fpr_judged", "FPR (judge) ↓")]
    concepts = sorted(c for c in long["concept"].unique() if c != "average")
    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, len(panels))
    width = 0.8 / len(FILTERS)
    for ax, (condition, metric, title) in zip(axes, panels):
        part = long[(long["condition"] == condition) & (long["metric"] == metric)]
        for i, f in enumerate(FILTERS):
            rows = part[part["filter"] == f].set_index("concept").reindex(concepts)
            value = rows["value"].astype(float).to_numpy()
            err = np.abs(np.vstack([value - rows["low"].astype(float), rows["high"].astype(float) - value]))
            ax.bar(np.arange(len(concepts)) + (i - 2) * width, value, width,
                   yerr=np.nan_to_num(err), capsize=1.5, label=FILTER_NAMES[f].split(" (")[0])
        ax.set_xticks(np.arange(len(concepts)), concepts, rotation=35, fontsize=7, ha="right")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "summary.png", dpi=110)
    return "summary.png"


def ablation_table(runs: list[dict], params: dict, variants: dict[str, list[str]],
                   concepts: set[str] | None = None) -> pd.DataFrame:
    """Fine-tuning variants as data: per variant, concept and rate, Espresso fine-tuned's
    value and interval, and zero-shot Espresso's (the same in every variant)."""
    rows = []
    for variant, overrides in variants.items():
        chosen = newest_per_concept(runs, with_overrides(params, overrides), ("evaluate",))
        for concept, run in sorted(chosen.items()):
            if concepts is not None and concept not in concepts:
                continue
            evaluate = run["metrics"]["reports/evaluate/metrics.json"]
            tuning = run["metrics"].get("reports/finetune/metrics.json") or {}
            for key in ABLATION_RATES:
                for f in ("espresso", "zero_shot"):
                    rows.append({"variant": variant, "concept": concept, "filter": f,
                                 "metric": key, **_rate(evaluate[f][key]),
                                 "chosen_epoch": tuning.get("chosen_epoch"),
                                 "experiment": run["name"]})
    return pd.DataFrame(rows)


def ablation_view(ablation: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One rate rendered: rows concepts, columns zero-shot Espresso then each variant's
    fine-tuned Espresso ('*' better, '!' worse than zero-shot beyond the intervals)."""
    lower_better = CLEAN_METRICS[metric][1]
    part = ablation[ablation["metric"] == metric]
    out = {}
    for (concept, variant), group in part.groupby(["concept", "variant"], sort=False):
        tuned = group[group["filter"] == "espresso"].iloc[0]
        zero = group[group["filter"] == "zero_shot"].iloc[0]
        out.setdefault("zero-shot", {})[concept] = cell(zero.to_dict())
        mark = {"better": " *", "worse": " !"}.get(_verdict(tuned, zero, lower_better), "")
        out.setdefault(variant, {})[concept] = f"{cell(tuned.to_dict())}{mark} e{tuned.chosen_epoch}"
    return pd.DataFrame(out).fillna("")


def probe_view(probe: pd.DataFrame) -> pd.DataFrame:
    """Rendered probe: one row per variant (zero-shot first), the probe's rates, and whether
    the target (PROBE_TARGET) is met by the point estimates."""
    rows = {}
    for variant, group in probe.groupby("variant", sort=False):
        for name, f in (("zero-shot (no fine-tuning)", "zero_shot"), (variant, "espresso")):
            rates = {r.metric: r for r in group[group["filter"] == f].itertuples()}
            row = {key: cell(rates[key]._asdict()) for key in ABLATION_RATES}
            row["target met"] = "yes" if all(rates[k].value <= v
                                             for k, v in PROBE_TARGET.items()) else "no"
            row["epoch"] = "" if f == "zero_shot" else group["chosen_epoch"].iloc[0]
            rows.setdefault(name, row)
    return pd.DataFrame(rows).T


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true",
                        help="first run one DVC experiment per concept of the setting")
    parser.add_argument("--ablation", action="store_true",
                        help="also the fine-tuning ablation (with --run: run its variants too)")
    parser.add_argument("--probe", metavar="CONCEPT",
                        help="also the fine-tuning probe (PROBES) on one concept (with --run: "
                             "run its variants too)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a param of the sweep, as in `dvc exp run -S` (e.g. setting=paper, "
                             "attack.adapt_to=[]); repeatable")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default: {OUT})")
    args = parser.parse_args(argv)
    try:
        params = check_params(with_overrides(load_params(), args.set),
                              "params.yaml with the -S overrides")
    except ParamsError as err:
        raise SystemExit("\n".join(f"error: {line}" for line in str(err).splitlines())) from None
    setting = params["setting"]
    if args.run:
        run_all_concepts(setting, args.set)
        if args.ablation:
            for variant, overrides in ABLATION.items():
                if overrides:
                    run_all_concepts(setting, args.set + overrides, target="evaluate")
        if args.probe:
            for variant, overrides in PROBES.items():
                if variant not in ABLATION or not args.ablation:
                    run_all_concepts(setting, args.set + overrides, target="evaluate",
                                     concepts=[args.probe])
    runs = experiments(json.loads(dvc("exp", "show", "--all-commits", "--json")))
    chosen = newest_per_concept(runs, params, ("evaluate", "attack"))
    if not chosen:
        raise SystemExit(f"error: no {setting} experiment with these params and evaluate and "
                         "attack metrics: run `python -m pipeline.summary --run` first")
    long = with_averages(long_table(chosen))
    ablation = ablation_table(runs, params, ABLATION) if args.ablation else pd.DataFrame()
    probe = (ablation_table(runs, params, PROBES, {args.probe}) if args.probe
             else pd.DataFrame())
    write_summary(args.out, params, args.set, long, ablation, probe)


def write_summary(out: Path, params: dict, overrides: list[str], long: pd.DataFrame,
                  ablation: pd.DataFrame, probe: pd.DataFrame) -> None:
    """summary.csv (and ablation.csv), rendered as README.md and index.html with a figure."""
    setting = params["setting"]
    world = ("offline mini world: shapes, mini CLIP, mini SD" if setting == "mini"
             else "SD v1.4 + CLIP ViT-L/14")
    intro = [f"Setting: {setting} ({world}). {HOW_TO_READ}", PLAIN_NOTE, CERTIFICATE_SCOPE]
    if overrides:
        intro.append("Params of this sweep, besides params.yaml: " + ", ".join(overrides) + ".")
    experiments_used = long[long["concept"] != "average"].groupby("concept")["experiment"].first()
    intro.append("Experiments: " + ", ".join(f"{c} = {e}" for c, e in experiments_used.items()) + ".")
    tables = {"Main table, clean prompts (average over concepts)": main_table(long, MAIN_CLEAN)}
    attacked = [c for c in CONDITIONS if (long["condition"] == c).any()]
    if attacked:
        tables["Main table, under the attacks (average over concepts; X+ adapted to each "
               f"filter, {PLAIN_MARK} plain where none is)"] = main_table(
            long, [column for column in MAIN_ATTACKED if column[0] in attacked])
    for key in ("clip_accuracy", "normalized_clip_score", "fnr_judged", "fpr_judged"):
        tables[CLEAN_METRICS[key][0]] = rate_table(long, "clean", key, PAPER.get(("clean", key)))
    for condition in attacked:
        tables[f"{condition}: CLIP accuracy under attack"] = rate_table(
            long, condition, "clip_accuracy", PAPER.get((condition, "clip_accuracy")))
    if attacked:
        tables["Worst attack success (shows c_u by judge and passed), and which attack"] = \
            worst_attack_table(long)
    for other in COMPARED:
        diff = differences(long, other)
        intro.append(difference_sentences(diff, other))
        tables[f"Espresso fine-tuned vs {FILTER_NAMES[other]} (beyond 95% intervals)"] = diff
    tables["Secondary: CLIP accuracy with blocked images scored as black"] = rate_table(
        long, "clean", "clip_accuracy_placeholder")
    black = long[long["metric"] == "black_image_p_unacceptable"].set_index("concept")["value"]
    tables["P_eval(u | black image) per concept"] = black.rename("P_eval(u|black)").to_frame()
    if not ablation.empty:
        for key in ABLATION_RATES:
            tables[f"Fine-tuning ablation: {CLEAN_METRICS[key][0]} (eN: chosen epoch; * better, "
                   "! worse than zero-shot beyond the intervals)"] = ablation_view(ablation, key)
    if not probe.empty:
        concept = probe["concept"].iloc[0]
        tables[f"Fine-tuning probe on {concept}: does any form, optimiser or budget reach FPR <= "
               f"{PROBE_TARGET['fpr_judged']:.2f} at FNR <= {PROBE_TARGET['fnr_judged']:.2f} "
               "(by the judge)?"] = probe_view(probe)
    with atomic_dir(out) as tmp:
        figures = {"Per concept and filter, with 95% intervals": summary_figure(long, tmp)}
        markdown, page = render(f"Espresso summary ({setting})", intro, tables, figures)
        (tmp / "README.md").write_text(markdown)
        (tmp / "index.html").write_text(page)
        long.to_csv(tmp / "summary.csv", index=False)
        if not ablation.empty:
            ablation.to_csv(tmp / "ablation.csv", index=False)
        if not probe.empty:
            probe.to_csv(tmp / "probe.csv", index=False)
    print(markdown)


if __name__ == "__main__":
    main()
