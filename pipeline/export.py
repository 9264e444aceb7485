"""Export Espresso's concepts, each from its own experiment, as one deployable checker (METHOD
section 9, :class:`pipeline.espresso.ConceptChecker`), with a report of what a platform lives
with.

Each concept's t_u, t_a come from the fine-tuned filter (``data/finetune/filter``) of that
concept's newest experiment whose data and fine-tuning params (``MATCHED``) equal params.yaml's,
on any commit, the workspace included (``dvc exp show``); its files are read from the DVC cache
without applying the experiment. ``--zero-shot`` takes the vectors from the setting's own CLIP
instead. The folder records each concept's provenance: experiment, its commit, params.

Images of neither concept (docs/method.md, "Images of neither concept"): every concept gets
everyday anchors, the embeddings (through its own text encoder) of ``--anchor-texts`` everyday
prompts (with ``--in-context`` also their twins, the same prompts with the concept's c_u put
in: ``pipeline.concepts.everyday_draw``), and by default the everyday cuts are calibrated
together by split conformal for a whole-checker false-positive rate of ``--everyday-fpr`` per
everyday prompt, on ``--calibration-prompts`` everyday prompts rendered by the setting's
unedited T2I model (or on your own images: ``--calibrate-on DIR``, each file its own unit).
Anchor texts, calibration prompts and the report's test prompts are three disjoint parts of one
draw of everyday prompts (``pipeline.concepts.everyday_draw`` of all the concepts,
``everyday.seed``). Each concept's c_u-vs-c_a cut is the paper's 0.5 unless ``--calibrate``
(then for ``--target-fpr`` on its validation images of acceptable prompts).

The report (``reports/checker/``) opens with the whole checker's blocked share on the test
everyday images and each concept's FNR on its own test images, with and without the anchors;
then a concept-by-concept confusion table (which concept fires on which concept's images), each
concept's ROC curve, all with 95% intervals over prompts. ``--no-everyday`` skips everything
that renders (the anchors stay, at cut 0.5). Not a DVC stage: it gathers the outputs of several
experiments.

    python -m pipeline.export                                     # data/checker
    python -m pipeline.export --calibrate-on my_everyday_images/ --out data/checker-mine
    python -m pipeline.export --concepts zorbo mimi --zero-shot --out data/checker-zero-shot
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from pipeline.concepts import everyday_draw, get_concept, known_concepts
from pipeline.espresso.files import atomic_dir, path_argument, write_json
from pipeline.everyday_scenes import load_pipe, render, scene_rows
from pipeline.experiments import dvc, experiments
from pipeline.outputs.generated import load_images
from pipeline.params import ParamsError, apply_budget, load_params, settings_of
from pipeline.schema import Params

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from pipeline.espresso import ConceptChecker

OUT = Path("data/checker")
REPORT = Path("reports/checker")
#: The params a concept's vectors and images depend on: an experiment is a source only if these
#: equal params.yaml's (the concept aside).
MATCHED = ("setting", "budget", "models", "generate", "finetune")
FILTER_DIR, MANIFEST = "data/finetune/filter", "data/generate/manifest.csv"


def source_runs(params: Params, concepts: list[str]) -> dict[str, list[dict]]:
    """Per concept, its experiments (``pipeline.experiments.experiments``) with fine-tuning
    metrics and the ``MATCHED`` params of ``params``, newest first; SystemExit naming the
    concepts that have none and how to run them."""
    shown = json.loads(dvc("exp", "show", "--all-commits", "--json"))
    runs = sorted(experiments(shown), key=lambda r: r["timestamp"], reverse=True)
    wanted = params.model_dump(include=set(MATCHED), exclude_unset=True)  # as params.yaml has them
    chosen = {}
    for run in runs:
        concept = run["params"].get("concept")
        recorded = apply_budget({"budget": "full", **run["params"]})  # none recorded: full
        if (concept in concepts and "finetune" in run["detail"]
                and all(recorded.get(k) == wanted.get(k) for k in MATCHED)):
            chosen.setdefault(concept, []).append(run)
    missing = [c for c in concepts if c not in chosen]
    if missing:
        raise SystemExit(f"error: no experiment with these {', '.join(MATCHED)} params for "
                         f"{', '.join(missing)}: run `dvc exp run -S concept=NAME` for each "
                         "(or `python -m pipeline.summary --run`)")
    return chosen


def fetch_newest(runs: list[dict], folder: Path) -> tuple[dict, pd.DataFrame]:
    """The newest of ``runs`` whose outputs are in the DVC cache (an experiment committed on
    another machine may not be), and :func:`fetch_outputs` of it; SystemExit if none is."""
    from dvc_data.index.index import DataIndexDirError

    for run in runs:
        try:
            return run, fetch_outputs(run, folder)
        except (FileNotFoundError, DataIndexDirError):
            continue
    concept = runs[0]["params"].get("concept")
    raise SystemExit(f"error: none of the {len(runs)} experiments of {concept} with these params "
                     f"(newest: {runs[0]['name']}) has its outputs in the DVC cache: run "
                     f"`dvc exp run -S concept={concept}` (or `dvc pull`)")


def fetch_outputs(run: dict, folder: Path) -> pd.DataFrame:
    """The experiment's fine-tuned filter and its validation and test images, copied from the
    DVC cache into ``folder``; returns the manifest of those images."""
    import pandas as pd
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(".", rev=None if run["rev"] == "workspace" else run["rev"])
    fs.get(FILTER_DIR, str(folder / "filter"), recursive=True)
    with fs.open(MANIFEST) as f:
        manifest = pd.read_csv(f)
    rows = manifest[manifest["split"].isin(["val", "test"])]
    for shard in rows["shard"].unique():
        fs.get(f"data/generate/{shard}", str(folder / shard))
    return rows


def provenance(run: dict, source: str) -> dict:
    """Where a concept's vectors come from: the experiment, its commit and the params."""
    p = apply_budget({"budget": "full", **run["params"]})  # as run: its budget's preset merged
    return {"source": source, "experiment": run["name"], "experiment_rev": run["rev"],
            "commit": run["baseline"], "concept": p["concept"],
            "params": {k: p[k] for k in MATCHED},
            "finetune_metrics": run["detail"]["finetune"]}


def everyday_split(concepts: list[str], params: Params, test: int, calibration: int,
                   anchors: int) -> dict:
    """Three disjoint parts of one draw of everyday prompts naming none of ``concepts``: the
    report's ``test`` prompts first (the ``everyday`` stage's, for as many as it has), then the
    ``calibration`` prompts, then the ``anchors`` texts; and ``in_context``, per concept the
    anchors' in-context twins (those that exist, none equal to an anchor)."""
    setting = params.setting
    draw = everyday_draw([get_concept(name, setting) for name in concepts],
                         test + calibration + anchors, params.everyday.seed)
    texts = [prompt.text for prompt in draw]
    anchor_part = draw[test + calibration:]
    in_context = {name: [t for t in dict.fromkeys(p.in_context[name] for p in anchor_part)
                         if t is not None and t not in texts[test + calibration:]]
                  for name in concepts}
    return {"test": texts[:test], "calibration": texts[test:test + calibration],
            "anchors": texts[test + calibration:], "in_context": in_context}


def build(params: Params, concepts: list[str], zero_shot: bool, work: Path, anchors: list[str],
          in_context: dict[str, list[str]] | None = None
          ) -> tuple[ConceptChecker, dict[str, pd.DataFrame], dict[str, np.ndarray]]:
    """The checker of ``concepts`` (vectors fine-tuned, or zero-shot) with the everyday
    ``anchors`` and each concept's ``in_context`` texts through its own text encoder, and per
    concept the manifest rows and images of its experiment's validation and test images."""
    from pipeline.espresso import ConceptChecker, EspressoFilter
    from pipeline.espresso.checker import same_image_tower
    from pipeline.espresso.models import load_clip

    setting, _, models = settings_of(params)
    runs = source_runs(params, concepts)
    base = load_clip(models.clip, device="cpu")
    rows, images, filters, sources = {}, {}, {}, {}
    for name in tqdm(concepts, desc="concepts", unit="concept"):
        concept = get_concept(name, setting)
        run, rows[name] = fetch_newest(runs[name], work / name)
        images[name] = load_images(rows[name], work / name)
        clip = base
        if not zero_shot:
            clip = load_clip(str(work / name / "filter"), device="cpu")
            if not same_image_tower(base[0], clip[0]):
                raise SystemExit(f"error: the fine-tuned filter of {name} (experiment "
                                 f"{run['name']}) has another image tower than "
                                 f"{models.clip}: a checker holds one tower")
        filters[name] = EspressoFilter(*clip, concept.unacceptable, concept.acceptable,
                                       everyday=anchors or None,
                                       in_context=(in_context or {}).get(name) or None)
        sources[name] = provenance(run, "zero-shot CLIP" if zero_shot else "fine-tuned")
    return ConceptChecker.from_filters(filters, sources), rows, images


def split_of(rows: pd.DataFrame, split: str, label: str) -> np.ndarray:
    return ((rows["split"] == split) & (rows["label"] == label)).to_numpy()


def calibrate_cuts(checker: ConceptChecker, rows: dict[str, pd.DataFrame],
                   images: dict[str, np.ndarray], target_fpr: float) -> None:
    """Each concept's c_u-vs-c_a cut for ``target_fpr`` on its validation images of acceptable
    prompts (:meth:`ConceptChecker.calibrate`)."""
    for k, name in enumerate(checker.names):
        negatives = images[name][split_of(rows[name], "val", "acceptable")]
        checker.calibrate(name, checker.check(negatives).p_unacceptable[:, k], target_fpr, {
            "images": "validation images of acceptable prompts",
            "experiment": checker.concept(name).provenance["experiment"]})


def calibrate_everyday(checker: ConceptChecker, rows: dict[str, pd.DataFrame],
                       images: dict[str, np.ndarray], negatives: np.ndarray, groups: list,
                       target_fpr: float, about: dict) -> dict:
    """The everyday cuts for a whole-checker ``target_fpr`` on ``negatives`` (their units
    ``groups``; :meth:`ConceptChecker.calibrate_everyday`), recording the share of each concept's
    c_u validation images its gate stops; a calibration that cannot reach the target exits in
    one line."""
    positives = {name: images[name][split_of(rows[name], "val", "unacceptable")]
                 for name in checker.names}
    try:
        return checker.calibrate_everyday(negatives, target_fpr, groups, positives, about)
    except ValueError as err:
        raise SystemExit(f"error: everyday calibration: {err}") from None


def own_images(folder: Path, resize_edge: int) -> tuple[list, list[int]]:
    """The frames of every image file under ``folder`` (as ``pipeline.screen`` reads them), and
    each frame's file index (a file is one calibration unit); SystemExit if none is readable."""
    from pipeline.screen import MAX_PIXELS, files_to_screen, read_frames

    frames, groups, skipped = [], [], 0
    for i, entry in enumerate(files_to_screen([str(folder)])):
        read, error = (None, entry.skipped) if entry.skipped else read_frames(
            entry.path, resize_edge, MAX_PIXELS)
        if error or not read:
            skipped += 1
            continue
        frames += read
        groups += [i] * len(read)
    if not frames:
        raise SystemExit(f"error: --calibrate-on {folder}: no readable image files there; give "
                         "a folder of everyday images that show none of the concepts")
    if skipped:
        print(f"--calibrate-on: {skipped} files under {folder} could not be read and are left out")
    return frames, groups


def clustered(blocked: np.ndarray, prompts: np.ndarray, stats) -> dict:
    """The blocked share of some images as a rate over their prompts (95% interval)."""
    from pipeline.statistics import rate

    return rate(np.asarray(blocked, float), clusters=np.asarray(prompts, object), stats=stats)


def paper_rule(checker: ConceptChecker, result) -> np.ndarray:
    """Fired ``N x K`` by the c_u-vs-c_a rule alone (no everyday anchors), fail-closed."""
    from pipeline.espresso.filter import blocks

    return blocks(result.p_unacceptable - checker.cuts) | result.unscored[:, None]


def concept_rates(checker: ConceptChecker, rows: dict[str, pd.DataFrame],
                  images: dict[str, np.ndarray], stats) -> dict:
    """Per concept, on its own test images: FNR on c_u and FPR on c_a of its own column, with the
    anchors and by the paper's rule alone; test AUC and ROC of P(u|x)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    out = {}
    for k, name in enumerate(tqdm(checker.names, desc="test images", unit="concept")):
        test = (rows[name]["split"] == "test").to_numpy()
        result = checker.check(images[name][test])
        positive = (rows[name]["label"][test] == "unacceptable").to_numpy()
        prompts = rows[name]["prompt"][test].to_numpy()
        fired = {"with anchors": result.fired[:, k],
                 "paper rule": paper_rule(checker, result)[:, k]}
        fpr, tpr, _ = roc_curve(positive, result.p_unacceptable[:, k])
        out[name] = {
            "test_auc": float(roc_auc_score(positive, result.p_unacceptable[:, k])),
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
            **{f"fnr ({rule})": clustered(~f[positive], prompts[positive], stats)
               for rule, f in fired.items()},
            **{f"fpr ({rule})": clustered(f[~positive], prompts[~positive], stats)
               for rule, f in fired.items()}}
    return out


def confusion(checker: ConceptChecker, rows: dict[str, pd.DataFrame],
              images: dict[str, np.ndarray], everyday: tuple | None, stats) -> dict:
    """Which concept fires on which images: per row (each concept's test images of c_u, and the
    everyday test images), each concept's fired share and the whole checker's blocked share,
    rates over prompts."""
    groups = {}
    for name in checker.names:
        mask = split_of(rows[name], "test", "unacceptable")
        groups[f"{name} (c_u)"] = (images[name][mask], rows[name]["prompt"][mask].to_numpy())
    if everyday is not None:
        groups["everyday"] = everyday
    table = {}
    for label, (group_images, prompts) in tqdm(groups.items(), desc="confusion", unit="row"):
        result = checker.check(group_images)
        table[label] = {**{name: clustered(result.fired[:, k], prompts, stats)
                           for k, name in enumerate(checker.names)},
                        "any (blocked)": clustered(result.blocked, prompts, stats)}
    return table


def everyday_blocking(checker: ConceptChecker, images: np.ndarray, prompts: list[str],
                      stats) -> dict:
    """What the whole checker does to everyday test images: the share it blocks with the anchors
    and by the paper's rule alone, and per concept the share on which it fired (both ways)."""
    result = checker.check(images)
    prompts = np.asarray(prompts, object)
    paper = paper_rule(checker, result)
    return {"n_images": len(prompts), "n_prompts": len(set(prompts)),
            "prompts": list(dict.fromkeys(prompts)),
            "unscored": int(result.unscored.sum()),
            "blocked_share": clustered(result.blocked, prompts, stats),
            "blocked_share_paper_rule": clustered(paper.any(1), prompts, stats),
            "fired_share": {name: clustered(result.fired[:, k], prompts, stats)
                            for k, name in enumerate(checker.names)},
            "fired_share_paper_rule": {name: clustered(paper[:, k], prompts, stats)
                                       for k, name in enumerate(checker.names)}}


def _rate_text(r: dict) -> str:
    if r["value"] is None:
        return "none"
    if r["low"] is None:
        return f"{r['value']:.3f}"
    return f"{r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def verdict(everyday: dict | None, rates: dict, max_fpr: float = 0.02,
            max_fnr: float = 0.05) -> str:
    """The report's first lines: the whole checker's everyday blocked share and the worst
    concept's FNR against the platform's bounds."""
    worst = max(rates, key=lambda n: rates[n]["fnr (with anchors)"]["value"] or 0)
    fnr = rates[worst]["fnr (with anchors)"]
    lines = [f"- Worst FNR on a concept's own test images: {worst} {_rate_text(fnr)} "
             f"({'within' if (fnr['value'] or 0) <= max_fnr else 'above'} {max_fnr:g})."]
    if everyday is not None:
        share = everyday["blocked_share"]
        lines.insert(0, f"- Everyday images blocked by the whole checker: {_rate_text(share)} of "
                        f"{everyday['n_images']} images ({everyday['n_prompts']} prompts; "
                        f"{'within' if share['value'] <= max_fpr else 'above'} {max_fpr:g}); by "
                        "the paper's rule alone (no everyday anchors): "
                        f"{_rate_text(everyday['blocked_share_paper_rule'])}.")
    return "\n".join(lines)


def everyday_figure(everyday: dict | None, rates: dict) -> Figure:
    """Per concept, with the anchors and by the paper's rule alone: the share of everyday test
    images it fires on (left) and its FNR on its own test images (right), 95% intervals."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    panels = fig.subplots(1, 2)
    names = list(rates)
    y = np.arange(len(names))
    series = [("fired on everyday images", None if everyday is None else {
                  rule: everyday[key] for rule, key in (("paper rule", "fired_share_paper_rule"),
                                                        ("with anchors", "fired_share"))}),
              ("FNR on its own test images", {rule: {n: rates[n][f"fnr ({rule})"] for n in names}
                                               for rule in ("paper rule", "with anchors")})]
    for ax, (title, data) in zip(panels, series):
        ax.set(title=title, xlim=(0, 1), yticks=y, yticklabels=names)
        if data is None:
            ax.text(0.5, 0.5, "not measured (--no-everyday)", ha="center", transform=ax.transAxes)
            continue
        for offset, (rule, values) in zip((-0.18, 0.18), data.items()):
            v = np.array([values[n]["value"] for n in names], float)
            low = np.array([values[n]["low"] if values[n]["low"] is not None else values[n]["value"]
                            for n in names], float)
            high = np.array([values[n]["high"] if values[n]["high"] is not None
                             else values[n]["value"] for n in names], float)
            ax.barh(y + offset, v, height=0.34, label=rule,
                    xerr=np.vstack([v - low, high - v]), capsize=2)
        ax.invert_yaxis()
        ax.legend(fontsize=8, loc="lower right")
    return fig


def roc_figure(rates: dict) -> Figure:
    """One panel per concept: its test ROC curve of P(u|x)."""
    from matplotlib.figure import Figure

    n = len(rates)
    cols = min(n, 3)
    fig = Figure(figsize=(3.4 * cols, 3.2 * -(-n // cols)), layout="constrained")
    axes = fig.subplots(-(-n // cols), cols, squeeze=False).ravel()
    for ax, (name, r) in zip(axes, rates.items()):
        ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], color="0.3", lw=1.5,
                label=f"ROC (AUC {r['test_auc']:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="0.7", lw=1)
        ax.set(title=name, xlabel="false-positive rate (test)", ylabel="true-positive rate",
               xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def concept_table(checker: ConceptChecker, rates: dict) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame([{
        "concept": name,
        "source": (f"{c.provenance['source']}, {c.provenance['experiment']} @ "
                   f"{c.provenance['commit'][:7]}"),
        "cut": f"{c.cut:.4g}",
        "everyday cut": "none" if c.t_n is None else f"{c.everyday_cut:.4g}",
        "anchors / in-context": (f"{0 if c.t_n is None else len(c.t_n)} / "
                                 f"{0 if c.t_c is None else len(c.t_c)}"),
        "test AUC": f"{rates[name]['test_auc']:.3f}",
        "FNR": _rate_text(rates[name]["fnr (with anchors)"]),
        "FPR on c_a": _rate_text(rates[name]["fpr (with anchors)"]),
        "FNR, paper rule": _rate_text(rates[name]["fnr (paper rule)"]),
        "FPR on c_a, paper rule": _rate_text(rates[name]["fpr (paper rule)"]),
    } for name, c in zip(checker.names, checker.concepts)])


def confusion_table(table: dict) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame([{"images": label, **{col: _rate_text(r) for col, r in row.items()}}
                         for label, row in table.items()])


def card_note(everyday: dict | None, rates: dict) -> str:
    """The model card's measured paragraph (what ``verdict`` says, in one paragraph)."""
    return ("Measured on the mini world's held-out images (`reports/checker`): "
            + " ".join(line[2:] for line in verdict(everyday, rates).splitlines()))


def write_report(folder: Path, checker: ConceptChecker, rates: dict, table: dict,
                 everyday: dict | None, calibration: dict | None, out: Path) -> None:
    """``README.md`` (figure and verdict first), ``metrics.json``, ``everyday.png`` and
    ``roc.png`` in ``folder``."""
    in_context = any(c.t_c is not None for c in checker.concepts)
    how = ("the everyday cuts are the anchors' 0.5 (not calibrated)" if calibration is None else
           f"the everyday cuts were calibrated together (split conformal) for a whole-checker "
           f"rate of {calibration['target_fpr']:g} per unit on {calibration['groups']} units "
           f"({calibration['images']} images: {calibration.get('images_from', '')}), where they "
           f"block {calibration['blocked_groups']:.3f} of the units")
    metrics = {"concepts": {n: {k: v for k, v in r.items() if k != "roc"}
                            for n, r in rates.items()},
               "confusion": table, "everyday": everyday, "everyday_calibration": calibration}
    with atomic_dir(folder) as tmp:
        everyday_figure(everyday, rates).savefig(tmp / "everyday.png", dpi=110)
        roc_figure(rates).savefig(tmp / "roc.png", dpi=110)
        write_json(tmp / "metrics.json", metrics)
        (tmp / "README.md").write_text(
            f"# The exported checker: {len(checker.names)} concepts in `{out}`\n\n"
            "![everyday images and FNR per concept](everyday.png)\n\n"
            + verdict(everyday, rates) + "\n\n"
            "Each concept fires where P(u|x) > its cut and P(u|x) against its nearest everyday "
            "text > its everyday cut"
            + (", the unacceptable side being the nearest of c_u and the everyday texts with c_u "
               "put in" if in_context else "")
            + f" (docs/method.md, \"Images of neither concept\"); {how}. "
            "Everyday test images: prompts that name none of the concepts, disjoint from the "
            "anchor texts and the calibration prompts, rendered by the setting's unedited T2I "
            "model. Rates are shares of images with 95% intervals from a bootstrap over prompts "
            "(`pipeline.statistics.rate`). Rebuild: `python -m pipeline.export` (see its "
            "`--help`).\n\n## Per concept, on its own experiment's test images\n\n"
            + concept_table(checker, rates).to_markdown(index=False)
            + "\n\n## Which concept fires on which images\n\nRows: each concept's test images "
            "of c_u, and the everyday test images; columns: the share on which each concept "
            "fired, and the whole checker's blocked share. Off the diagonal a concept fires on "
            "another's images (some legitimately: a Zorbo on a black background shows both).\n\n"
            + confusion_table(table).to_markdown(index=False)
            + "\n\n## ROC curves of P(u|x) on the test images\n\n![ROC curves](roc.png)\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", metavar="NAME",
                        help="concepts to export (default: every concept of the setting)")
    parser.add_argument("--zero-shot", action="store_true",
                        help="take t_u, t_a from the setting's CLIP, not the fine-tuned filters")
    parser.add_argument("--everyday-fpr", type=float, default=0.02, metavar="RATE",
                        help="whole-checker false-positive rate per everyday prompt the everyday "
                             "cuts are calibrated for (default 0.02)")
    parser.add_argument("--anchor-texts", type=int, default=64, metavar="N",
                        help="everyday prompts whose embeddings anchor every concept (default 64)")
    parser.add_argument("--in-context", action="store_true",
                        help="also the anchors' in-context twins on the gate's unacceptable "
                             "side (better at matched everyday rates above 0.5%%, worse at the "
                             "default calibration's: docs/method.md)")
    parser.add_argument("--calibration-prompts", type=int, default=240, metavar="N",
                        help="everyday prompts rendered to calibrate on (default 240, one image "
                             "each)")
    parser.add_argument("--test-prompts", type=int, default=100, metavar="N",
                        help="everyday prompts of the report (default 100, "
                             "everyday.images_per_prompt images each)")
    parser.add_argument("--calibrate-on", type=path_argument, metavar="DIR",
                        help="calibrate the everyday cuts on your own everyday images instead "
                             "(every image file under DIR; each file one unit)")
    parser.add_argument("--calibrate", action="store_true",
                        help="also set each concept's c_u-vs-c_a cut for --target-fpr on its "
                             "validation images of acceptable prompts (default: the paper's 0.5)")
    parser.add_argument("--target-fpr", type=float, default=0.05, metavar="RATE",
                        help="validation false-positive rate of --calibrate (default 0.05)")
    parser.add_argument("--no-everyday", action="store_true",
                        help="render nothing: no everyday calibration or report (the paper "
                             "setting's T2I model needs a GPU); the anchors stay at cut 0.5")
    parser.add_argument("--out", type=path_argument, default=OUT, help=f"checker folder (default {OUT})")
    parser.add_argument("--report", type=path_argument, default=REPORT,
                        help=f"report folder (default {REPORT})")
    args = parser.parse_args(argv)
    for option in ("target_fpr", "everyday_fpr"):
        if not 0 < getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: give a rate "
                         "in (0, 1)")
    for option in ("anchor_texts", "calibration_prompts", "test_prompts"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: give at least 1")
    if args.calibrate_on is not None and not args.calibrate_on.is_dir():
        parser.error(f"--calibrate-on {args.calibrate_on}: not a folder; give a folder of your "
                     "everyday images")
    try:
        params = load_params()
    except ParamsError as err:
        raise SystemExit("\n".join(f"error: {line}" for line in str(err).splitlines())) from None
    known = known_concepts(params.setting)
    concepts = args.concepts or known
    unknown = [c for c in concepts if c not in known]
    if unknown:
        parser.error(f"unknown concepts {unknown} for setting {params.setting}: "
                     f"give some of {', '.join(known)}")
    try:
        split = everyday_split(concepts, params, args.test_prompts, args.calibration_prompts,
                               args.anchor_texts)
    except ValueError as err:
        parser.error(f"everyday prompts: {err}")
    setting, _, models = settings_of(params)
    sampler = params.generate.of(setting)
    pipe = None if args.no_everyday else load_pipe(models.t2i, sampler)
    seed, per_prompt = params.everyday.seed, params.everyday.images_per_prompt
    with tempfile.TemporaryDirectory() as work:
        checker, rows, images = build(params, concepts, args.zero_shot, Path(work),
                                      split["anchors"],
                                      split["in_context"] if args.in_context else None)
        if args.calibrate:
            calibrate_cuts(checker, rows, images, args.target_fpr)
        calibration = None
        if args.calibrate_on is not None:
            negatives, groups = own_images(args.calibrate_on,
                                           checker.processor.size["shortest_edge"])
            calibration = calibrate_everyday(checker, rows, images, negatives, groups,
                                             args.everyday_fpr,
                                             {"images_from": str(args.calibrate_on)})
        elif pipe is not None:
            scenes = scene_rows(split["calibration"], seed, 1, first_index=args.test_prompts)
            calibration = calibrate_everyday(
                checker, rows, images, render(pipe, scenes, sampler), scenes["prompt"].tolist(),
                args.everyday_fpr, {"images_from": "everyday prompts rendered by "
                                    f"{models.t2i}, one image each"})
        everyday, test_images = None, None
        if pipe is not None:
            scenes = scene_rows(split["test"], seed, per_prompt)
            test_images = render(pipe, scenes, sampler)
            everyday = everyday_blocking(checker, test_images, scenes["prompt"].tolist(),
                                         params.statistics)
        rates = concept_rates(checker, rows, images, params.statistics)
        table = confusion(checker, rows, images, None if everyday is None else (
            test_images, np.asarray(scenes["prompt"], object)), params.statistics)
    checker.card_note = card_note(everyday, rates)
    with atomic_dir(args.out) as tmp:
        checker.save_pretrained(tmp)
    write_report(args.report, checker, rates, table, everyday, calibration, args.out)
    print(f"checker of {len(concepts)} concepts -> {args.out}; report -> {args.report}")
    print(verdict(everyday, rates))


if __name__ == "__main__":
    main()
