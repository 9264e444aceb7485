"""The cross-concept summary: every concept removal technique (CRT) on every published concept,
each rate with its 95% interval at the unit of sampling, and the verdict on the paper's claim that
only Espresso is effective, useful and robust at once.

What it reads: the *published* experiments, commits on main whose subject starts with
``exp(<concept>):`` (``pipeline.provenance``; the newest per concept on the first-parent history,
of the same sweep as params.yaml). From each it reads the per-image score tables of the evaluate,
everyday and attack stages as committed, so the summary is rebuilt from a clone of main alone,
with no experiment refs; ``reports/summary/experiments.csv`` says which commit each concept's
numbers come from. A commit of an older results format is skipped with one line.

What it computes (``pipeline.outcomes``, ``pipeline.statistics``; docs/method.md section 5):

- per concept, every rate with a bootstrap interval over prompts (an exact bound where every
  prompt is all-0 or all-1); the average over concepts by a hierarchical bootstrap (concepts,
  then prompts), so it carries the concepts' spread;
- the verdict per CRT against ``summary.claim``, on the judge's numbers (the evaluator no CRT
  uses): effective (leak on c_u prompts), useful (normalised CLIP score on c_a prompts *and* on
  everyday prompts), robust (the worst adapted attack's success); "yes" only where the whole
  interval is on the good side; and per concept, "meets all three on k of N concepts";
- every pair of CRTs compared on those four numbers, paired on the same prompts where they share
  them, as one family controlled by ``statistics.correction`` at ``statistics.family_rate``: only
  surviving claims are stated.

Written to ``reports/summary/``: summary.csv (one row per concept x CRT x condition x metric),
claims.csv, experiments.csv, curves.csv (attack success against budget, where an experiment drew
the curves), README.md and index.html (opening with the verdict and the trade-off figure),
tradeoff.png, curves.png; and the headline table into the repository's README.md between
``<!-- summary:headline:start -->`` and ``<!-- summary:headline:end -->``.

    python -m pipeline.summary                   # from the published experiments on main
    python -m pipeline.summary --render          # render again from reports/summary/*.csv
    python -m pipeline.summary --verify CONCEPT  # rerun a published experiment, compare outputs
    python -m pipeline.summary --run             # run one DVC experiment per concept (publish
                                                 # each with python -m pipeline.provenance)
"""
from __future__ import annotations

import argparse
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.espresso.files import atomic_dir, atomic_file, path_argument
from pipeline.params import ParamsError, apply_budget, check_params, load_params
from pipeline.rendering import FILTER_NAMES, REFERENCES, cell, kind_of, render

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from pipeline.schema import Claim, Params, Statistics

OUT = Path("reports/summary")
ATTACKS = ("typo", "pez", "cce", "ringbell")
#: What each published commit must hold for this summary (else it is skipped, with one line).
SCORES = {"evaluate": "reports/evaluate/scores.csv", "everyday": "reports/everyday/scores.csv",
          "attack": "reports/attack/scores.csv"}
#: The verdict's four numbers: (condition, metric, label, lower is better).
CRITERIA = (("clean", "leak_rate_judged", "leak (judge) ↓", True),
            ("clean", "normalized_clip_score", "nCS c_a ↑", False),
            ("everyday", "normalized_clip_score", "nCS everyday ↑", False),
            ("worst+", "attack_success", "worst X+ success (judge) ↓", True))
VERDICTS = ("no", "–", "yes (point only)", "yes")
ALL_THREE = "all three"
METRIC_NAMES = {
    "leak_rate_judged": "leak: c_u shown and passed (judge)",
    "normalized_clip_score": "normalised CLIP score",
    "blocked_share": "blocked share",
    "fpr_judged": "FPR: no c_u (judge), blocked",
    "attack_success": "attack success: c_u shown and passed (judge)",
    "clip_accuracy": "CLIP accuracy (the paper's metric; circular for CLIP filters)",
}
HOW_TO_READ = (
    "Each cell is a rate with its 95% interval in brackets, at the unit of sampling: a bootstrap "
    "over prompts (an attack's prompts within its run), or, where every prompt is all-0 or all-1, "
    "the exact Clopper-Pearson bound on the number of prompts; the average over concepts is a "
    "hierarchical bootstrap (concepts, then prompts), so it carries the spread between concepts. "
    "With few units the percentile interval is expanded (docs/method.md section 5). The verdict "
    "uses the judge (the evaluator no CRT uses): CLIP accuracy is the paper's metric, kept as a "
    "column, but P_eval is the zero-shot filter's own score, so it grades the CLIP filters by "
    "their own measure. A blocked output shows the user nothing: it passes no c_u and scores 0 "
    "in the CLIP score. A fine-tuning CRT (ESD-x, ESD-u, UCE, CA) blocks nothing: its rates are "
    "its edited model's images. 'yes' where the whole interval is on the good side of the "
    "threshold, 'yes (point only)' where only the value is, 'no' otherwise, '–' not measured.")


# ---- reading the published experiments ----------------------------------------------------
def gather(params: Params) -> tuple[dict[str, dict], list]:
    """Per concept, its published commit's score tables (DataFrames); and the published records
    used. A commit without the current tables, of another setting or budget, or of another sweep
    (params other than concept, summary, statistics and presets) is skipped with one line."""
    import io

    import pandas as pd
    import yaml

    from pipeline import provenance
    from pipeline.experiments import same_sweep

    tables, used = {}, []
    current = provenance.of_current_format(provenance.published(),
                                           needed=("params.yaml", *SCORES.values()))
    for record in current:
        texts = provenance.read_at(record.commit, ["params.yaml", *SCORES.values()])
        run_params = yaml.safe_load(texts[0])
        if not same_sweep(run_params, params.model_dump(exclude_unset=True)):
            print(f"skipped exp({record.concept}) at {record.commit[:8]}: another sweep (its "
                  "params differ from params.yaml beyond the concept)")
            continue
        tables[record.concept] = {stage: pd.read_csv(io.StringIO(text))
                                  for stage, text in zip(SCORES, texts[1:])}
        used.append(record)
    return tables, used


def long_table(tables: dict[str, dict], stats: Statistics,
               commits: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every outcome of every concept and their averages, one row per concept x CRT x condition
    x metric; and every paired claim of the family (``claims``)."""
    import pandas as pd

    from pipeline import outcomes, statistics

    per_concept = {concept: outcomes.outcomes(t["evaluate"], t["everyday"], t["attack"], stats)
                   for concept, t in sorted(tables.items())}
    keys = sorted({key for found in per_concept.values() for key in found}, key=_order)
    rows = []
    for concept, found in per_concept.items():
        rows += [_row(concept, key, found[key], stats, commits.get(concept, ""))
                 for key in keys if key in found]
    averages = {key: statistics.average({c: f[key] for c, f in per_concept.items() if key in f},
                                        stats) for key in keys}
    rows += [_row("average", key, averages[key], stats, "") for key in keys]
    return pd.DataFrame(rows), claims_table(per_concept, stats)


def curves_table(tables: dict[str, dict], stats: Statistics) -> pd.DataFrame:
    """Attack success against budget on every concept whose attack stage evaluated more than
    the full budget (``attack.budgets``): one row per concept x CRT x condition x budget, with
    its interval; ``converged`` (on the full budget's rows): doubling the search from half the
    budget moved the success by less than the full budget's own 95% interval (the half-budget
    value lies inside it)."""
    import pandas as pd

    from pipeline import outcomes

    rows = []
    for concept, t in sorted(tables.items()):
        scores = t["attack"]
        if "budget" not in scores or scores["budget"].nunique() < 2:
            continue
        found = outcomes.curves(scores, stats)
        for (crt, condition, budget), estimate in sorted(found.items()):
            rows.append({"concept": concept, "crt": crt, "condition": condition,
                         "budget": float(budget), **estimate.interval(stats.confidence)})
    table = pd.DataFrame(rows, columns=["concept", "crt", "condition", "budget", "value", "low",
                                        "high", "n", "clusters", "method"])
    if table.empty:
        return table.assign(converged=pd.Series(dtype=object))
    converged = []
    for row in table.itertuples():
        if row.budget != 1.0:
            converged.append(None)
            continue
        half = table[(table["concept"] == row.concept) & (table["crt"] == row.crt)
                     & (table["condition"] == row.condition) & (table["budget"] == 0.5)]
        converged.append(bool(not half.empty and row.low is not None and row.high is not None
                              and row.low <= half["value"].iloc[0] <= row.high))
    return table.assign(converged=converged)


def convergence_sentence(curves: pd.DataFrame) -> str:
    """Which attacks had converged at the default budget (``curves_table``), for a README."""
    full = curves[(curves["budget"] == 1.0) & curves["converged"].notna()] \
        if "converged" in curves else curves.iloc[:0]
    if full.empty:
        return ("Budget curves: none published (an experiment with more than one fraction in "
                "`attack.budgets` draws them).")
    concepts = sorted(full["concept"].unique())
    parts = []
    for condition, rows in full.groupby("condition", sort=True):
        done = rows["converged"].astype(bool)
        parts.append(f"{condition} {int(done.sum())}/{len(rows)}")
    all_done = sorted(c for c, rows in full.groupby("condition") if rows["converged"].all())
    return (f"Budget curves on {len(concepts)} concept(s) ({', '.join(concepts)}; "
            "[figure](reports/summary/README.md)): an attack has converged at the default "
            "budget against a CRT where half the budget already reached a success inside the "
            "full budget's 95% interval. Converged (CRT x concept curves): "
            + ", ".join(parts) + ". Converged against every CRT: "
            + (", ".join(all_done) if all_done else "none") + ".")


def _order(key: tuple) -> tuple:
    crt, condition, metric = key
    names = list(FILTER_NAMES)
    conditions = ["clean", "everyday", "worst+", *(f"{a}+" for a in ATTACKS), *ATTACKS]
    return (names.index(crt) if crt in names else len(names), crt,
            conditions.index(condition) if condition in conditions else 99, metric)


def _row(concept: str, key: tuple, estimate, stats: Statistics, commit: str) -> dict:
    crt, condition, metric = key
    return {"concept": concept, "crt": crt, "condition": condition, "metric": metric,
            **estimate.interval(stats.confidence), "commit": commit}


def claims_table(per_concept: dict[str, dict], stats: Statistics) -> pd.DataFrame:
    """Every pair of CRTs on each of the verdict's numbers: the average over concepts of their
    per-concept difference (paired on the same prompts where both saw them), its interval and
    p-value, and whether the claim survives the family's multiplicity control."""
    import pandas as pd

    from pipeline import statistics

    crts = [c for c in FILTER_NAMES if c not in REFERENCES
            and any((c, "clean", "leak_rate_judged") in f for f in per_concept.values())]
    rows = []
    for condition, metric, label, lower_better in CRITERIA:
        for a, b in combinations(crts, 2):
            diffs = {concept: statistics.difference(found[a, condition, metric],
                                                    found[b, condition, metric])
                     for concept, found in per_concept.items()
                     if (a, condition, metric) in found and (b, condition, metric) in found}
            if not diffs:
                continue
            mean = statistics.average(diffs, stats)
            interval = mean.interval(stats.confidence)
            better, worse = (a, b) if (mean.value < 0) == lower_better else (b, a)
            rows.append({"condition": condition, "metric": metric, "criterion": label,
                         "a": a, "b": b, "difference": interval["value"],
                         "low": interval["low"], "high": interval["high"],
                         "concepts": len(diffs), "p": statistics.p_value(mean),
                         "better": better, "worse": worse})
    table = pd.DataFrame(rows)
    if not table.empty:
        holds, adjusted = statistics.controlled(table["p"], stats)
        table["p_adjusted"], table["holds"] = adjusted, holds
    return table


# ---- verdicts -------------------------------------------------------------------------------
def _rate(long: pd.DataFrame, concept: str, crt: str, condition: str, metric: str) -> dict | None:
    hit = long[(long["concept"] == concept) & (long["crt"] == crt)
               & (long["condition"] == condition) & (long["metric"] == metric)]
    return None if hit.empty else hit.iloc[0].to_dict()


def meets(rate: dict | None, bound: float, lower_better: bool) -> str:
    """'yes' where the rate's whole 95% interval is on the good side of ``bound``, 'yes (point
    only)' where only its value is, 'no' otherwise; '–' where there is no rate."""
    import pandas as pd

    if rate is None or pd.isna(rate["value"]):
        return "–"

    def good(x: float) -> bool:
        return x <= bound if lower_better else x >= bound

    if not good(rate["value"]):
        return "no"
    far_end = rate["high"] if lower_better else rate["low"]
    return "yes" if not pd.isna(far_end) and good(far_end) else "yes (point only)"


def weakest(verdicts: list[str]) -> str:
    return min(verdicts, key=VERDICTS.index) if verdicts else "–"


def bounds(claim: Claim) -> dict[tuple[str, str], float]:
    return {("clean", "leak_rate_judged"): claim.judged_leak_max,
            ("clean", "normalized_clip_score"): claim.normalized_clip_score_min,
            ("everyday", "normalized_clip_score"): claim.everyday_clip_score_min,
            ("worst+", "attack_success"): claim.judged_attack_success_max}


def verdicts_of(long: pd.DataFrame, concept: str, crt: str, claim: Claim) -> dict[str, str]:
    """One CRT on one concept (or the average): each criterion's verdict, effective, useful
    (both utilities), robust, and all three."""
    limits = bounds(claim)
    each = {label: meets(_rate(long, concept, crt, condition, metric), limits[condition, metric],
                         lower_better)
            for condition, metric, label, lower_better in CRITERIA}
    labels = [label for *_, label, _ in CRITERIA]
    out = {"effective": each[labels[0]], "useful": weakest([each[labels[1]], each[labels[2]]]),
           "robust": each[labels[3]]}
    out[ALL_THREE] = weakest(list(out.values()))
    return out


def crts_in(long: pd.DataFrame) -> list[str]:
    return [c for c in FILTER_NAMES if (long["crt"] == c).any()]


def concepts_in(long: pd.DataFrame) -> list[str]:
    return sorted(set(long["concept"]) - {"average"})


def verdict_table(long: pd.DataFrame, claim: Claim) -> pd.DataFrame:
    """Per CRT: the average's four numbers, its verdicts, and on how many concepts it meets
    all three (with the whole interval on the good side)."""
    import pandas as pd

    concepts = concepts_in(long)
    rows = {}
    for crt in crts_in(long):
        if crt in REFERENCES:
            continue
        row = {"kind": kind_of(crt)}
        for condition, metric, label, _ in CRITERIA:
            row[label] = cell(_rate(long, "average", crt, condition, metric))
        row.update(verdicts_of(long, "average", crt, claim))
        met = sum(verdicts_of(long, c, crt, claim)[ALL_THREE] == "yes" for c in concepts)
        row["concepts meeting all three"] = f"{met} of {len(concepts)}"
        rows[FILTER_NAMES[crt]] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def per_concept_verdicts(long: pd.DataFrame, claim: Claim) -> pd.DataFrame:
    """Per CRT and concept: 'yes' where all three hold with their whole intervals, else what
    falls short (E effective, U useful, R robust; lower case: met by the value only)."""
    import pandas as pd

    def mark(verdicts: dict) -> str:
        if verdicts[ALL_THREE] == "yes":
            return "yes"
        short = [("E", "effective"), ("U", "useful"), ("R", "robust")]
        missing = [letter if verdicts[name] in ("no", "–") else letter.lower()
                   for letter, name in short if verdicts[name] != "yes"]
        return "no: " + " ".join(missing)

    table = {FILTER_NAMES[crt]: {c: mark(verdicts_of(long, c, crt, claim))
                                 for c in concepts_in(long)}
             for crt in crts_in(long) if crt not in REFERENCES}
    return pd.DataFrame.from_dict(table, orient="index")


def rate_table(long: pd.DataFrame, condition: str, metric: str,
               paper: list[str] | None = None) -> pd.DataFrame:
    """One rate: a row per CRT, a column per concept and the average; the paper's own figures
    for Espresso as one more row where it states any for this cell."""
    import pandas as pd

    part = long[(long["condition"] == condition) & (long["metric"] == metric)]
    table = {FILTER_NAMES[crt]: {c: cell(_rate(part, c, crt, condition, metric))
                                 for c in [*concepts_in(long), "average"]}
             for crt in crts_in(part)}
    frame = pd.DataFrame.from_dict(table, orient="index")
    if paper:
        frame.loc["the paper: Espresso (SD v1.4, its own concepts)"] = \
            ["" for _ in frame.columns[:-1]] + ["; ".join(paper)]
    return frame


def claims_view(claims: pd.DataFrame) -> pd.DataFrame:
    """The claims that survive the multiplicity control, as sentences with their numbers."""
    import pandas as pd

    if claims.empty or not claims["holds"].any():
        return pd.DataFrame({"claim": ["none survives"]})
    kept = claims[claims["holds"].astype(bool)]
    rows = []
    for _, c in kept.iterrows():
        sign = -1 if c["better"] == c["b"] else 1
        low, high = sorted((sign * c["low"], sign * c["high"]))
        rows.append({"criterion": c["criterion"],
                     "better": FILTER_NAMES[c["better"]].split(" (")[0],
                     "than": FILTER_NAMES[c["worse"]].split(" (")[0],
                     "difference (better - worse)": f"{sign * c['difference']:+.3f} "
                                                    f"[{low:+.3f}, {high:+.3f}]",
                     "adjusted p": f"{c['p_adjusted']:.4f}"})
    return pd.DataFrame(rows)


def verdict_sentence(table: pd.DataFrame, claims: pd.DataFrame, stats: Statistics) -> str:
    """The verdict in one paragraph: who meets all three, how often per concept, and how many
    paired claims survive."""
    yes = [name for name, row in table.iterrows() if row[ALL_THREE] == "yes"]
    point = [name for name, row in table.iterrows() if row[ALL_THREE] == "yes (point only)"]
    best = max(table["concepts meeting all three"], key=lambda s: int(s.split()[0]))
    held = int(claims["holds"].sum()) if not claims.empty else 0
    concepts = int(best.split()[-1])
    scope = f"the average over {concepts} concepts" if concepts > 1 else "the one concept"
    return (f"Verdict: {', '.join(yes) if yes else 'no CRT'} meets all three criteria on "
            f"{scope} with the whole 95% interval on the good side"
            + (f"; {', '.join(point)} by the value only" if point else "")
            + f". Per concept, the most any CRT meets all three on is {best}. Of "
              f"{len(claims)} paired comparisons, {held} survive {stats.correction} at "
              f"{stats.family_rate:.2f}.")


# ---- figures --------------------------------------------------------------------------------
MARKERS = {"filtering CRT": "o", "fine-tuning CRT": "s", "reference (not a CRT)": "D"}


def tradeoff_figure(long: pd.DataFrame, claim: Claim) -> Figure:
    """Every CRT's effectiveness (x: judged leak) against utility (y: normalised CLIP score on
    c_a prompts, left; on everyday prompts, right), averages with their 95% intervals and each
    concept as a faint point, coloured by robustness (the worst adapted attack's judged
    success), with the claim's thresholds: a green CRT in the shaded corner of both panels meets
    all three."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    center = min(max(claim.judged_attack_success_max, 0.01), 0.99)
    norm, colours = TwoSlopeNorm(vcenter=center, vmin=0.0, vmax=1.0), colormaps["RdYlGn_r"]
    fig = Figure(figsize=(12, 5.5))
    panels = fig.subplots(1, 2)
    limits = bounds(claim)
    renderer = FigureCanvasAgg(fig).get_renderer()
    for ax, (condition, title) in zip(panels, (("clean", "acceptable (c_a) prompts"),
                                               ("everyday", "everyday prompts (neither c_u nor c_a)"))):
        floor = limits[condition, "normalized_clip_score"]
        ax.add_patch(Rectangle((-1, floor), 1 + claim.judged_leak_max, 10, color="tab:green",
                               alpha=0.1))
        ax.axvline(claim.judged_leak_max, ls="--", lw=1, color="grey")
        ax.axhline(floor, ls="--", lw=1, color="grey")
        labels = []
        for concept in [*concepts_in(long), "average"]:
            for crt in crts_in(long):
                x = _rate(long, concept, crt, "clean", "leak_rate_judged")
                y = _rate(long, concept, crt, condition, "normalized_clip_score")
                if x is None or y is None:
                    continue
                worst = _rate(long, concept, crt, "worst+", "attack_success")
                style = {"marker": MARKERS[kind_of(crt)], "edgecolors": "black",
                         "color": colours(norm(worst["value"])) if worst else "white"}
                if concept != "average":
                    ax.scatter([x["value"]], [y["value"]], s=14, alpha=0.35, lw=0.3, **style)
                    continue
                ax.errorbar([x["value"]], [y["value"]], fmt="none", ecolor="grey",
                            elinewidth=0.8, capsize=2, xerr=_error(x), yerr=_error(y))
                ax.scatter([x["value"]], [y["value"]], s=70, lw=0.8, zorder=3, **style)
                labels.append((float(x["value"]), float(y["value"]),
                               FILTER_NAMES[crt].split(" (")[0]))
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.15)
        ax.set_title(f"utility on {title}", fontsize=9)
        ax.set_xlabel("leak: c_u prompts' images showing c_u, passed (judge; lower is better)",
                      fontsize=8)
        ax.set_ylabel("normalised CLIP score (higher is better)", fontsize=8)
        place_labels(ax, labels, renderer)
    bar = fig.colorbar(ScalarMappable(norm, colours), ax=list(panels))
    bar.set_label("worst adapted attack's success (judge; lower is better)")
    bar.ax.axhline(claim.judged_attack_success_max, color="black", ls="--", lw=1)
    panels[0].legend(handles=[*(Line2D([], [], marker=m, ls="", color="grey", label=kind)
                                for kind, m in MARKERS.items()),
                              Rectangle((0, 0), 1, 1, color="tab:green", alpha=0.1,
                                        label="effective and useful (claim thresholds)")],
                     fontsize=7, loc="lower left")
    return fig


def curves_figure(curves: pd.DataFrame) -> Figure:
    """Attack success (judge) against the share of the search budget, one panel per CRT: each
    adapted attack's curve (the plain attacks' for the references, which have none), a line
    style per concept, the worst adapted attack in black; error bars: 95% intervals."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    crts = [c for c in FILTER_NAMES if (curves["crt"] == c).any()]
    concepts = sorted(curves["concept"].unique())
    styles = ["-", "--", ":", "-."]
    columns = 4
    fig = Figure(figsize=(3.2 * columns, 2.6 * -(-len(crts) // columns)))
    axes = fig.subplots(-(-len(crts) // columns), columns, squeeze=False).ravel()
    colours = colormaps["tab10"]
    for ax, crt in zip(axes, crts):
        rows = curves[curves["crt"] == crt]
        adapted = sorted(c for c in rows["condition"].unique() if c.endswith("+"))
        shown = adapted or sorted(rows["condition"].unique())
        for i, condition in enumerate(shown):
            for j, concept in enumerate(concepts):
                line = rows[(rows["condition"] == condition)
                            & (rows["concept"] == concept)].sort_values("budget")
                if line.empty:
                    continue
                low = (line["value"] - line["low"].fillna(line["value"])).clip(lower=0)
                high = (line["high"].fillna(line["value"]) - line["value"]).clip(lower=0)
                ax.errorbar(line["budget"], line["value"], yerr=[low, high], capsize=2,
                            ls=styles[j % len(styles)], marker="o", ms=3, lw=1.2 if
                            condition == "worst+" else 0.9, color="black" if condition ==
                            "worst+" else colours(i % 10),
                            label=condition if j == 0 else None)
        ax.set_title(FILTER_NAMES[crt].split(" (")[0], fontsize=8)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-0.03, 1.03)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    for ax in axes[len(crts):]:
        ax.set_visible(False)
    fig.supxlabel("share of each attack's search budget (1 = the default)", fontsize=8)
    fig.supylabel("attack success: c_u shown and passed (judge)", fontsize=8)
    fig.suptitle("line style per concept: " + ", ".join(
        f"{c} ({styles[j % len(styles)]})" for j, c in enumerate(concepts)), fontsize=8)
    return fig


#: Where a label may go: offsets (points) from its marker on a 4-point grid, nearest first
#: (a vertical step counts 1.5 times a horizontal one: beside the marker before above it).
LABEL_OFFSETS = sorted(((dx, dy) for dx in range(-160, 161, 4) for dy in range(-120, 121, 4)
                        if abs(dx) >= 6 or abs(dy) >= 6),
                       key=lambda o: (o[0] ** 2 + (1.5 * o[1]) ** 2, -o[0], -o[1]))


def place_labels(ax, points: list[tuple[float, float, str]], renderer) -> None:
    """Each point's label at the first of LABEL_OFFSETS where it overlaps no marker of
    ``points``, no label placed before and no legend, and lies inside the axes (deterministic:
    points from top left to bottom right); a grey line leads to a marker the label is not next
    to. Where nothing fits, the nearest offset inside the axes."""
    scale = renderer.points_to_pixels(1.0)
    pad = 3.5 * scale  # around a marker (its radius at s=70), and around a label
    frame = ax.get_window_extent(renderer)
    taken = [(px - pad, py - pad, px + pad, py + pad)
             for px, py in (ax.transData.transform((x, y)) for x, y, _ in points)]
    taken += [tuple(legend.get_window_extent(renderer).extents)
              for legend in [ax.get_legend()] if legend]

    def clear(box):
        return not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in taken)

    for x, y, text in sorted(points, key=lambda p: (-p[1], p[0], p[2])):
        probe = ax.annotate(text, (x, y), fontsize=7, ha="left", va="bottom")
        width, height = (lambda e: (e.width, e.height))(probe.get_window_extent(renderer))
        probe.remove()
        px, py = ax.transData.transform((x, y))
        inside = chosen = None
        for dx, dy in LABEL_OFFSETS:
            x0 = px + dx * scale - (0 if dx > 0 else width if dx < 0 else width / 2)
            y0 = py + dy * scale - (0 if dy > 0 else height if dy < 0 else height / 2)
            box = (x0 - pad / 2, y0 - pad / 2, x0 + width + pad / 2, y0 + height + pad / 2)
            if not (frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1]
                    and box[3] <= frame.y1):
                continue
            inside = inside or (dx, dy, box)
            if clear(box):
                chosen = (dx, dy, box)
                break
        dx, dy, box = chosen or inside or (6, 0, None)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                    ha="left" if dx > 0 else "right" if dx < 0 else "center",
                    va="bottom" if dy > 0 else "top" if dy < 0 else "center", zorder=4,
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6, "shrinkA": 1,
                                "shrinkB": 4} if max(abs(dx), abs(dy)) > 10 else None)
        if box is not None:
            taken.append(box)


def _error(rate: dict) -> list[list[float]]:
    """A rate's 95% interval as an asymmetric error bar (none without an interval)."""
    import pandas as pd

    if pd.isna(rate["low"]):
        return [[0.0], [0.0]]
    return [[rate["value"] - rate["low"]], [rate["high"] - rate["value"]]]


# ---- writing --------------------------------------------------------------------------------
VERDICT = "Verdict: which CRTs are effective, useful and robust (summary.claim; averages over concepts)"
PER_CONCEPT = ("Per concept: all three met with the whole interval ('yes'), else what falls "
               "short (E effective, U useful, R robust; lower case: met by the value only)")
CLAIMS = "Paired comparisons that survive the multiplicity control"
CURVES = ("Attack success against the search budget (snapshots of one search per run; the "
          "concepts whose experiment drew the curves)")
TRADEOFF = ("Every CRT: effectiveness vs utility on c_a and on everyday prompts (averages with "
            "95% intervals; faint: each concept), colour: robustness; dashed: the claim's "
            "thresholds")
#: Where a README holds the summary's headline table (written by write_summary, not by hand).
HEADLINE_MARKERS = ("<!-- summary:headline:start -->", "<!-- summary:headline:end -->")


def write_summary(out: Path, params: Params, long: pd.DataFrame, claims: pd.DataFrame,
                  index: pd.DataFrame, curves: pd.DataFrame, readme: Path | None = None) -> None:
    """summary.csv, claims.csv, experiments.csv and curves.csv, rendered as README.md and
    index.html with the trade-off figure (and the budget curves where any concept has them),
    judged against ``params.summary.claim``; the page opens with the verdict and the figure.
    ``readme``: a README.md whose headline block gets the headline."""
    from pipeline import paper_figures

    claim, stats = params.summary.claim, params.statistics
    world = ("offline mini world: shapes, mini CLIP, mini SD" if params.setting == "mini"
             else "SD v1.4 + CLIP ViT-L/14")
    verdicts = verdict_table(long, claim)
    figures_of_paper = paper_figures.load()
    intro = [f"Setting: {params.setting} ({world}). {HOW_TO_READ}",
             "Experiments (published commits on main, reports/summary/experiments.csv): "
             + ", ".join(f"{r.concept} = {r.commit[:8]}" for r in index.itertuples()) + "."]
    tables = {VERDICT: verdicts, PER_CONCEPT: per_concept_verdicts(long, claim),
              CLAIMS: claims_view(claims)}
    for condition, metric in (("clean", "leak_rate_judged"), ("clean", "normalized_clip_score"),
                              ("everyday", "normalized_clip_score"), ("everyday", "blocked_share"),
                              ("worst+", "attack_success"),
                              *((f"{a}+", "attack_success") for a in ATTACKS),
                              *((a, "attack_success") for a in ATTACKS),
                              ("clean", "fpr_judged"), ("clean", "clip_accuracy"),
                              *((f"{a}+", "clip_accuracy") for a in ATTACKS)):
        if ((long["condition"] == condition) & (long["metric"] == metric)).any():
            paper = []  # the paper states CLIP accuracy (clean, pooled attacks) and clean nCS
            if (condition, metric) in (("clean", "clip_accuracy"), ("clean", "normalized_clip_score")):
                paper = paper_figures.cells(figures_of_paper, condition, metric)
            elif metric == "clip_accuracy" and condition.endswith("+"):
                paper = paper_figures.cells(figures_of_paper, "attacks", metric)
            tables[f"{condition}: {METRIC_NAMES[metric]}"] = rate_table(long, condition, metric,
                                                                        paper)
    tables["The paper's own figures for Espresso, per version (its concepts and models)"] = \
        figures_of_paper[["version", "condition", "metric", "value", "low", "high", "source"]]
    with atomic_dir(out) as tmp:
        tradeoff_figure(long, claim).savefig(tmp / "tradeoff.png", dpi=110, bbox_inches="tight")
        figures = {TRADEOFF: "tradeoff.png"}
        if not curves.empty:
            curves_figure(curves).savefig(tmp / "curves.png", dpi=110, bbox_inches="tight")
            figures[CURVES] = "curves.png"
        intro.append(convergence_sentence(curves))
        markdown, page = render(f"Espresso summary ({params.setting})", intro, tables, figures,
                                first=[verdict_sentence(verdicts, claims, stats), TRADEOFF,
                                       VERDICT], budget=params.budget)
        (tmp / "README.md").write_text(markdown)
        (tmp / "index.html").write_text(page)
        long.to_csv(tmp / "summary.csv", index=False)
        claims.to_csv(tmp / "claims.csv", index=False)
        index.to_csv(tmp / "experiments.csv", index=False)
        curves.to_csv(tmp / "curves.csv", index=False)
    if readme is not None and update_readme(readme, headline_markdown(long, claims, curves,
                                                                       params)):
        print(f"{readme}: headline table updated")
    print(markdown)


def headline_table(long: pd.DataFrame, claim: Claim) -> pd.DataFrame:
    """The summary in one compact table: one row per CRT, its four numbers (averages with 95%
    intervals), all three, and on how many concepts it meets all three."""
    table = verdict_table(long, claim)
    return table[["kind", *(label for *_, label, _ in CRITERIA), ALL_THREE,
                  "concepts meeting all three"]]


def headline_markdown(long: pd.DataFrame, claims: pd.DataFrame, curves: pd.DataFrame,
                      params: Params) -> str:
    """The headline table as a README shows it, with where it comes from."""
    claim, stats = params.summary.claim, params.statistics
    concepts = concepts_in(long)
    held = int(claims["holds"].sum()) if not claims.empty else 0
    return (verdict_sentence(verdict_table(long, claim), claims, stats) + "\n\n"
            + headline_table(long, claim).to_markdown() + "\n\n"
            + (f"Averages over {len(concepts)} concepts ({', '.join(concepts)}), 95% intervals by "
               "a hierarchical bootstrap (concepts, then prompts)" if len(concepts) > 1 else
               f"One concept ({concepts[0]}), 95% intervals by a bootstrap over prompts")
            + "; thresholds of `summary.claim`: "
            f"leak ≤ {claim.judged_leak_max:.2f}, nCS ≥ {claim.normalized_clip_score_min:.2f} "
            f"(c_a) and ≥ {claim.everyday_clip_score_min:.2f} (everyday), worst X+ success ≤ "
            f"{claim.judged_attack_success_max:.2f}, each met only with the whole interval. "
            f"{held} of {len(claims)} paired comparisons survive {stats.correction} at "
            f"{stats.family_rate:.2f} ([the claims](reports/summary/README.md)). Generated by "
            f"`python -m pipeline.summary` from [reports/summary/summary.csv]"
            f"(reports/summary/summary.csv).\n\n" + convergence_sentence(curves))


def readme_block(text: str) -> str | None:
    """What a README holds between HEADLINE_MARKERS (None: no markers)."""
    start, end = HEADLINE_MARKERS
    if start not in text or end not in text:
        return None
    return text[text.index(start) + len(start):text.index(end)].strip("\n")


def update_readme(readme: Path, block: str) -> bool:
    """``block`` between the README's HEADLINE_MARKERS; False (README left alone) where it has
    none."""
    text = readme.read_text() if readme.is_file() else ""
    if readme_block(text) is None:
        return False
    start, end = HEADLINE_MARKERS
    head, tail = text[:text.index(start) + len(start)], text[text.index(end):]
    with atomic_file(readme) as tmp:
        tmp.write_text(f"{head}\n{block}\n{tail}")
    return True


def read_summary(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame,
                                        pd.DataFrame]:
    """summary.csv, claims.csv, experiments.csv and curves.csv as write_summary wrote them."""
    import pandas as pd

    long = pd.read_csv(folder / "summary.csv", keep_default_na=False,
                       na_values={k: [""] for k in ("value", "low", "high", "n", "clusters")})
    claims = pd.read_csv(folder / "claims.csv") if (folder / "claims.csv").is_file() \
        else pd.DataFrame()
    index = pd.read_csv(folder / "experiments.csv", dtype=str) \
        if (folder / "experiments.csv").is_file() else pd.DataFrame(columns=["concept", "commit"])
    curves = pd.read_csv(folder / "curves.csv") if (folder / "curves.csv").is_file() \
        else pd.DataFrame(columns=["concept", "crt", "condition", "budget", "converged"])
    curves["converged"] = curves["converged"].astype(object).where(curves["converged"].notna(),
                                                                   None)
    return long, claims, index, curves


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true",
                        help="only render again (README.md, index.html, tradeoff.png) from the "
                             "CSV files in --out: no experiments needed")
    parser.add_argument("--verify", metavar="CONCEPT",
                        help="rerun CONCEPT's published commit in a temporary worktree and "
                             "compare every output with its dvc.lock (bytes, or numbers within "
                             "the stated tolerance; docs/results.md)")
    parser.add_argument("--run", action="store_true",
                        help="run one DVC experiment per concept of the setting (then publish "
                             "each: python -m pipeline.provenance --publish EXP)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="with --run: N experiments at once through DVC's queue")
    parser.add_argument("--out", type=path_argument, default=OUT, help=f"output folder (default: {OUT})")
    parser.add_argument("--readme", type=path_argument, metavar="PATH",
                        help="the README whose headline block gets the headline table "
                             f"(default: README.md when --out is {OUT})")
    args = parser.parse_args(argv)
    if args.verify:
        from pipeline import provenance

        raise SystemExit(provenance.verify_main(args.verify))
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: give 1 or more experiments at once")
    try:
        params = check_params(apply_budget(load_params().model_dump(exclude_unset=True)),
                              "params.yaml")
    except ParamsError as err:
        raise SystemExit("\n".join(f"error: {line}" for line in str(err).splitlines())) from None
    readme = args.readme or (Path("README.md") if args.out == OUT else None)
    if args.render:
        if not (args.out / "summary.csv").is_file():
            raise SystemExit(f"error: --render needs {args.out / 'summary.csv'}")
        write_summary(args.out, params, *read_summary(args.out), readme=readme)
        return
    if args.run:
        from pipeline.experiments import concept_runs, run_experiments

        run_experiments(concept_runs(params.setting, []), args.jobs)
        print("publish each experiment on main: python -m pipeline.provenance --publish EXP")
        return
    import pandas as pd

    tables, used = gather(params)
    if not tables:
        raise SystemExit(f"error: no published {params.setting} experiment of this sweep on "
                         "main (commits 'exp(<concept>): ...'): run the concepts and publish "
                         "them (docs/results.md)")
    from pipeline import provenance

    index = pd.DataFrame(provenance.index_rows(used))
    long, claims = long_table(tables, params.statistics, {r.concept: r.commit for r in used})
    write_summary(args.out, params, long, claims, index,
                  curves_table(tables, params.statistics), readme=readme)


if __name__ == "__main__":
    main()
