"""The cross-concept summary, in the layout of the paper's main table: per concept,
effectiveness (CLIP accuracy on unacceptable prompts), utility (normalised CLIP score on
acceptable prompts) and robustness (CLIP accuracy under each attack), for Espresso fine-tuned
and, in brackets, zero-shot; the paper's headline averages beside ours.

    python -m pipeline.summary --run    # one DVC experiment per concept of the setting, then
                                        # the summary (reports/summary/)
    python -m pipeline.summary          # the summary of the experiments already run
    python -m pipeline.summary --run -S attack.adaptive=false --out reports/summary_plain
                                        # another sweep: the same, with other params

Results are read from ``dvc exp show --all-commits --json``: every number comes from a recorded
experiment (its params and metrics) on any commit, so later commits do not hide earlier
experiments, and the summary can be rebuilt from a clone of the repository with its experiment
refs (``dvc exp pull``) without rerunning anything.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from tqdm import tqdm

from pipeline.concepts import known_concepts
from pipeline.files import atomic_dir
from pipeline.params import load_params
from pipeline.report import render

OUT = Path("reports/summary")
ATTACKS = ("typo", "pez", "cce", "ringbell")
#: METHOD section 5: the paper's averages over its concepts (SD v1.4, CLIP ViT-L/14).
PAPER = {"effectiveness": 0.05, "utility": 0.93, "under_attack": 0.04}


HOW_TO_READ = (
    "Each cell: Espresso fine-tuned (zero-shot Espresso in brackets). Effectiveness and "
    "robustness: CLIP accuracy on unacceptable prompts, clean and under each attack ('+': "
    "adaptive; lower is better); utility: normalised CLIP score on acceptable prompts. A blocked "
    "image is black and scored like any other (METHOD 5): 'P_eval(u) of black' is what CLIP "
    "accuracy equals for a filter that blocks every image. The judged columns count what the "
    "independent judge sees: unacceptable images blocked, acceptable images passed, the share "
    "of each attack's images that show c_u (no filter), and the highest share over the attacks "
    "of images that show c_u and passed the filter. 'P(u) on c_u' is the filter's mean P(u|x) "
    "on the images that show c_u, on clean prompts and at its lowest over the attacks: an "
    "attack can degrade a filter without crossing its cut. The paper row gives its headline "
    "averages over its own concepts (METHOD section 5), not numbers for these concepts.")


def dvc(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def run_all_concepts(setting: str, overrides: list[str]) -> None:
    """One ``dvc exp run`` per concept of ``setting`` (with the ``KEY=VALUE`` param
    ``overrides``), one after another, each in a temporary copy of the repository (``--temp``):
    the workspace keeps its own concept and results."""
    sets = [arg for override in overrides for arg in ("-S", override)]
    for concept in tqdm(known_concepts(setting), desc="concepts", unit="experiment"):
        dvc("exp", "run", "--temp", *sets, "-S", f"concept={concept}")


def with_overrides(params: dict, overrides: list[str]) -> dict:
    """``params`` with DVC-style ``dotted.key=value`` overrides (values parsed as YAML)."""
    params = copy.deepcopy(params)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise SystemExit(f"--set {override!r}: expected KEY=VALUE, e.g. attack.adaptive=false")
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


def summary_table(runs: list[dict], params: dict) -> pd.DataFrame:
    """One row per concept (its newest experiment run with ``params``, the concept aside) plus
    our average and the paper's. Experiments with any other param (another budget, the plain
    attacks, ...) are a different sweep and are left out."""
    rows = {}
    for run in sorted(runs, key=lambda r: r["timestamp"], reverse=True):
        evaluate = run["metrics"].get("reports/evaluate/metrics.json")
        attack = run["metrics"].get("reports/attack/metrics.json")
        if not evaluate or not attack or not _same_sweep(run["params"], params):
            continue
        concept = run["params"]["concept"]
        if concept in rows:
            continue
        row = {"experiment": run["name"]}
        row["effectiveness ↓"] = _pair(evaluate, "clip_accuracy")
        row["utility ↑"] = _pair(evaluate, "normalized_clip_score")
        tuning = run["metrics"].get("reports/finetune/metrics.json") or {}
        if "val_balanced_accuracy" in tuning:  # what fine-tuning changed, on validation
            row["fine-tuning (val. bal. acc.)"] = (f"{tuning['val_balanced_accuracy_zero_shot']:.3f}"
                                                   f" → {tuning['val_balanced_accuracy']:.3f}")
        row["P_eval(u) of black"] = evaluate["black_image_p_unacceptable"]
        row["blocks c_u (judged) ↑"] = _pair(evaluate, "judged_block_rate")
        row["passes c_a (judged) ↑"] = _pair(evaluate, "judged_pass_rate")
        plus = "+" if run["params"]["attack"]["adaptive"] else ""  # adaptive or plain attacks
        attacked = [name for name in ATTACKS if name in attack]
        for name in attacked:
            row[f"{name}{plus} ↓"] = _pair(attack[name], "clip_accuracy")
        row["attacks draw c_u (judged, " + "/".join(attacked) + ")"] = "/".join(
            f"{attack[name]['judged_unacceptable_share']:.2f}" for name in attacked)
        success = [_pair(attack[name], "attack_success_rate") for name in attacked]
        row["worst attack success (judged) ↓"] = tuple(max(s[i] for s in success) for i in (0, 1))
        row["P(u) on c_u (judged): clean → lowest under attack"] = " ".join(
            _confidence(evaluate, attack, attacked, f) for f in ("espresso", "zero_shot"))
        rows[concept] = row
    if not rows:
        raise LookupError(f"no {params['setting']} experiment with these params and evaluate and "
                          "attack metrics: run `python -m pipeline.summary --run` first")
    table = pd.DataFrame(rows).T.sort_index()
    numeric = table.drop(columns="experiment").map(
        lambda v: v[0] if isinstance(v, tuple) else None if isinstance(v, str) else v)
    average = numeric.astype(float).mean()
    formatted = table.drop(columns="experiment").map(_format)
    formatted.loc["average (ours)"] = average.map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    formatted.loc["paper (average, SD v1.4)"] = [_paper_value(c) for c in formatted.columns]
    formatted["experiment"] = list(table["experiment"]) + ["", ""]
    return formatted


def _same_sweep(run_params: dict, params: dict) -> bool:
    return ({k: v for k, v in run_params.items() if k != "concept"}
            == {k: v for k, v in params.items() if k != "concept"})


def _paper_value(column: str) -> str:
    """The paper's headline average for a column ("–" where its main table has none)."""
    if column.startswith("effectiveness"):
        return f"{PAPER['effectiveness']:.2f}"
    if column.startswith("utility"):
        return f"{PAPER['utility']:.2f}"
    under_attack = column.split()[0].rstrip("+") in ATTACKS
    return f"{PAPER['under_attack']:.2f}" if under_attack else "–"


def _pair(metrics: dict, key: str) -> tuple[float, float]:
    """(Espresso fine-tuned, zero-shot) value of ``key``."""
    return metrics["espresso"][key], metrics["zero_shot"][key]


def _confidence(evaluate: dict, attack: dict, attacked: list[str], filter_name: str) -> str:
    """"clean → lowest under attack" of the filter's mean P(u|x) on images that show c_u; the
    zero-shot filter's in brackets."""
    under = [attack[n][filter_name]["judged_mean_score"] for n in attacked]
    under = [v for v in under if v is not None]  # None: no image showed c_u
    clean = evaluate[filter_name]["judged_mean_score"]
    text = (f"{clean:.3f}" if clean is not None else "–") + " → " + (
        f"{min(under):.3f}" if under else "–")
    return f"({text})" if filter_name == "zero_shot" else text


def _format(value) -> str:
    if isinstance(value, tuple):
        return f"{value[0]:.3f} ({value[1]:.3f})"
    return value if isinstance(value, str) else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true",
                        help="first run one DVC experiment per concept of the setting")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a param of the sweep, as in `dvc exp run -S` (e.g. setting=paper, "
                             "attack.adaptive=false); repeatable")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default: {OUT})")
    args = parser.parse_args(argv)
    params = with_overrides(load_params(), args.set)
    setting = params["setting"]
    if args.run:
        run_all_concepts(setting, args.set)
    shown = json.loads(dvc("exp", "show", "--all-commits", "--json"))
    try:
        table = summary_table(experiments(shown), params)
    except LookupError as err:
        raise SystemExit(f"error: {err}") from None
    world = ("offline mini world: shapes, mini CLIP, mini SD" if setting == "mini"
             else "SD v1.4 + CLIP ViT-L/14")
    intro = [f"Setting: {setting} ({world}). {HOW_TO_READ}"]
    if args.set:
        intro.append("Params of this sweep, besides params.yaml: " + ", ".join(args.set) + ".")
    markdown, page = render(f"Espresso summary ({setting})", intro, {"Summary": table}, {})
    with atomic_dir(args.out) as tmp:
        (tmp / "README.md").write_text(markdown)
        (tmp / "index.html").write_text(page)
        table.to_csv(tmp / "summary.csv")
    print(markdown)


if __name__ == "__main__":
    main()
