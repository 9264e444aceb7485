"""Export Espresso's concepts, each from its own experiment, as one deployable checker (METHOD
section 9, :class:`pipeline.espresso.ConceptChecker`), with a report of its operating points.

Each concept's t_u, t_a come from the fine-tuned filter (``data/finetune/filter``) of that
concept's newest experiment whose data and fine-tuning params (``MATCHED``) equal params.yaml's,
on any commit, the workspace included (``dvc exp show``); its files are read from the DVC cache
without applying the experiment. ``--zero-shot`` takes the vectors from the setting's own CLIP
instead. The folder records each concept's provenance: experiment, its commit, params.

Every cut is the paper's decision, P(u|x) > 0.5, unless ``--calibrate``: then each concept's cut
is set for ``--target-fpr`` on its experiment's validation images of acceptable prompts. The
report (``reports/checker/``) shows each concept's ROC curve on its held-out test images, with
the point at 0.5 and at the cut calibrated for ``--target-fpr``, and the rates with 95%
intervals. It also renders everyday scenes, prompts that name none of its concepts
(``pipeline.concepts.everyday_prompts`` of them all, ``everyday`` params) with the setting's
unedited T2I model, and reports the share of them the whole checker blocks, and which of its
concepts fired, each with its interval over prompts (``--no-everyday`` skips them). Not a DVC
stage: it gathers the outputs of several experiments.

    python -m pipeline.export                                     # data/checker, cuts 0.5
    python -m pipeline.export --calibrate --target-fpr 0.05 --out data/checker-fpr05
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

from pipeline.concepts import get_concept, known_concepts
from pipeline.espresso.files import atomic_dir, write_json
from pipeline.everyday_scenes import load_pipe, plan_scenes, render
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


def source_runs(params: Params, concepts: list[str]) -> dict[str, dict]:
    """Per concept, its newest experiment (``pipeline.experiments.experiments``) with fine-tuning
    metrics and the ``MATCHED`` params of ``params``; SystemExit naming the concepts that have
    none and how to run them."""
    shown = json.loads(dvc("exp", "show", "--all-commits", "--json"))
    runs = sorted(experiments(shown), key=lambda r: r["timestamp"], reverse=True)
    wanted = params.model_dump(include=set(MATCHED), exclude_unset=True)  # as params.yaml has them
    chosen = {}
    for run in runs:
        concept = run["params"].get("concept")
        recorded = apply_budget({"budget": "full", **run["params"]})  # none recorded: full
        if (concept in concepts and "finetune" in run["detail"]
                and all(recorded.get(k) == wanted.get(k) for k in MATCHED)):
            chosen.setdefault(concept, run)
    missing = [c for c in concepts if c not in chosen]
    if missing:
        raise SystemExit(f"error: no experiment with these {', '.join(MATCHED)} params for "
                         f"{', '.join(missing)}: run `dvc exp run -S concept=NAME` for each "
                         "(or `python -m pipeline.summary --run`)")
    return chosen


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


def build(params: Params, concepts: list[str], zero_shot: bool, work: Path
          ) -> tuple[ConceptChecker, dict[str, pd.DataFrame], dict[str, np.ndarray]]:
    """The checker of ``concepts`` (vectors fine-tuned, or zero-shot), and per concept the
    manifest rows and images of its experiment's validation and test images."""
    from pipeline.espresso import ConceptChecker, EspressoFilter
    from pipeline.espresso.checker import CheckerConcept, same_image_tower, vision_tower
    from pipeline.espresso.models import load_clip

    setting, _, models = settings_of(params)
    runs = source_runs(params, concepts)
    base = load_clip(models.clip, device="cpu")
    rows, images, table = {}, {}, []
    for name in tqdm(concepts, desc="concepts", unit="concept"):
        concept = get_concept(name, setting)
        rows[name] = fetch_outputs(runs[name], work / name)
        images[name] = load_images(rows[name], work / name)
        if zero_shot:
            filt = EspressoFilter(*base, concept.unacceptable, concept.acceptable)
        else:
            filt = EspressoFilter.from_pretrained(work / name / "filter", device="cpu")
            if not same_image_tower(base[0], filt.clip):
                raise SystemExit(f"error: the fine-tuned filter of {name} (experiment "
                                 f"{runs[name]['name']}) has another image tower than "
                                 f"{models.clip}: a checker holds one tower")
        table.append(CheckerConcept(
            name, concept.unacceptable, concept.acceptable, filt.t_u.cpu(), filt.t_a.cpu(),
            filt.logit_scale,
            provenance=provenance(runs[name], "zero-shot CLIP" if zero_shot else "fine-tuned")))
    return ConceptChecker(vision_tower(base[0]), base[2], table), rows, images


def operating_points(checker: ConceptChecker, rows: dict[str, pd.DataFrame],
                     images: dict[str, np.ndarray], target_fpr: float, calibrate: bool
                     ) -> tuple[dict, dict]:
    """Per concept: its cut for ``target_fpr`` on validation (set as the checker's cut if
    ``calibrate``), and on test its ROC curve, AUC and the error rates at 0.5 and at that cut."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from pipeline.espresso import cut_for_fpr
    from pipeline.espresso.metrics import error_rates

    points, curves = {}, {}
    for k, name in enumerate(tqdm(checker.names, desc="operating points", unit="concept")):
        p = checker.check(images[name]).p_unacceptable[:, k]
        unacceptable = (rows[name]["label"] == "unacceptable").to_numpy()
        val, test = [(rows[name]["split"] == s).to_numpy() for s in ("val", "test")]
        negatives = p[val & ~unacceptable]
        cut = (checker.calibrate(name, negatives, target_fpr, {
                   "images": "validation images of acceptable prompts",
                   "experiment": checker.concept(name).provenance["experiment"]})
               if calibrate else cut_for_fpr(negatives, target_fpr))
        fpr, tpr, _ = roc_curve(unacceptable[test], p[test])
        curves[name] = (fpr, tpr)
        points[name] = {
            "cut_in_checker": checker.concept(name).cut, "calibrated_cut": cut,
            "validation_fpr_at_calibrated_cut": float((negatives > cut).mean()),
            "test_auc": float(roc_auc_score(unacceptable[test], p[test])),
            "test_at_0.5": error_rates(p[test] > 0.5, unacceptable[test]),
            "test_at_calibrated_cut": error_rates(p[test] > cut, unacceptable[test])}
    return points, curves


def everyday_images(params: Params, concepts: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The everyday scenes of ``concepts`` (prompts naming none of them; seeds of
    ``pipeline.everyday_scenes``) and their images by the setting's unedited T2I model."""
    setting, _, models = settings_of(params)
    sampler = params.generate.of(setting)
    scenes = plan_scenes([get_concept(name, setting) for name in concepts], params.everyday)
    return scenes, render(load_pipe(models.t2i, sampler), scenes, sampler)


def everyday_blocking(checker: ConceptChecker, images: np.ndarray, prompts: list[str],
                      stats) -> dict:
    """What the whole checker does to everyday images (of prompts that name none of its
    concepts): the share it blocks and, per concept, the share on which that concept fired, each
    a rate over prompts (``pipeline.statistics.rate``, ``stats``: ``params.statistics``)."""
    from pipeline.statistics import rate

    result = checker.check(images)
    prompts = np.asarray(prompts, object)
    return {"n_images": len(prompts), "n_prompts": len(set(prompts)),
            "prompts": list(dict.fromkeys(prompts)),
            "unscored": int(result.unscored.sum()),
            "blocked_share": rate(np.asarray(result.blocked, float), clusters=prompts,
                                  stats=stats),
            "fired_share": {name: rate(np.asarray(result.fired[:, k], float), clusters=prompts,
                                       stats=stats)
                            for k, name in enumerate(checker.names)}}


def everyday_table(everyday: dict) -> pd.DataFrame:
    """The everyday section of the report: the whole checker's blocked share, then each
    concept's fired share."""
    import pandas as pd

    rows = [("whole checker: blocked", everyday["blocked_share"])]
    rows += [(f"{name} fired", fired) for name, fired in everyday["fired_share"].items()]
    return pd.DataFrame([{"everyday images": label, "share": _rate_text(r),
                          "images": r["n"], "prompts": r["clusters"]} for label, r in rows])


def _rate_text(r: dict) -> str:
    if r["value"] is None:
        return "none"
    if r["low"] is None:
        return f"{r['value']:.3f}"
    return f"{r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def roc_figure(curves: dict, points: dict, target_fpr: float) -> Figure:
    """One panel per concept: its test ROC curve and the two operating points."""
    from matplotlib.figure import Figure

    n = len(curves)
    cols = min(n, 3)
    fig = Figure(figsize=(3.4 * cols, 3.2 * -(-n // cols)), layout="constrained")
    axes = fig.subplots(-(-n // cols), cols, squeeze=False).ravel()
    for ax, (name, (fpr, tpr)) in zip(axes, curves.items()):
        point = points[name]
        ax.plot(fpr, tpr, color="0.3", lw=1.5, label=f"ROC (AUC {point['test_auc']:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="0.7", lw=1)
        for key, marker, label in (("test_at_0.5", "o", "P(u|x) > 0.5 (paper)"),
                                   ("test_at_calibrated_cut", "s",
                                    f"cut for val. FPR {target_fpr:g}")):
            rates = point[key]
            ax.plot(rates["fpr"]["value"], 1 - rates["fnr"]["value"], marker, ms=7, label=label)
        ax.set(title=name, xlabel="false-positive rate (test)", ylabel="true-positive rate",
               xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def report_table(checker: ConceptChecker, points: dict) -> pd.DataFrame:
    import pandas as pd

    def rate(r: dict) -> str:
        return f"{r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"

    return pd.DataFrame([{
        "concept": name,
        "source": (f"{c.provenance['source']}, {c.provenance['experiment']} @ "
                   f"{c.provenance['commit'][:7]}"),
        "cut in checker": f"{c.cut:.4g}",
        "test AUC": f"{points[name]['test_auc']:.3f}",
        "FPR @ 0.5": rate(points[name]["test_at_0.5"]["fpr"]),
        "FNR @ 0.5": rate(points[name]["test_at_0.5"]["fnr"]),
        "calibrated cut": f"{points[name]['calibrated_cut']:.4g}",
        "FPR @ calibrated": rate(points[name]["test_at_calibrated_cut"]["fpr"]),
        "FNR @ calibrated": rate(points[name]["test_at_calibrated_cut"]["fnr"]),
    } for name, c in zip(checker.names, checker.concepts)])


def write_report(folder: Path, checker: ConceptChecker, points: dict, curves: dict,
                 target_fpr: float, out: Path, everyday: dict | None = None) -> None:
    """``README.md``, ``metrics.json`` (per concept its operating points; ``everyday``: the
    everyday section, where there is one) and ``roc.png`` in ``folder``."""
    table = report_table(checker, points)
    section = "" if everyday is None else (
        f"\n## Everyday scenes\n\n{everyday['n_images']} images of {everyday['n_prompts']} "
        "prompts that name none of the checker's concepts (`pipeline.concepts.everyday_prompts`, "
        "params `everyday`), rendered by the setting's unedited T2I model: the share the whole "
        "checker blocks (each prompt asks for a scene of none of them), and per "
        "concept the share on which it fired; 95% intervals, a bootstrap over prompts.\n\n"
        + everyday_table(everyday).to_markdown(index=False) + "\n")
    with atomic_dir(folder) as tmp:
        roc_figure(curves, points, target_fpr).savefig(tmp / "roc.png", dpi=110)
        write_json(tmp / "metrics.json",
                   points if everyday is None else {**points, "everyday": everyday})
        (tmp / "README.md").write_text(
            f"# The exported checker: {len(checker.names)} concepts in `{out}`\n\n"
            "Each concept's rates on its own experiment's held-out test images (prompt labels), "
            "at the paper's cut (P(u|x) > 0.5) and at the cut calibrated for a validation "
            f"false-positive rate of {target_fpr:g} (on the validation images of acceptable "
            "prompts); 95% Wilson intervals. `cut in checker` is the cut the exported folder "
            "uses. Rebuild: `python -m pipeline.export` (see its `--help`).\n\n"
            + table.to_markdown(index=False) + "\n\n![ROC curves](roc.png)\n" + section)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", metavar="NAME",
                        help="concepts to export (default: every concept of the setting)")
    parser.add_argument("--zero-shot", action="store_true",
                        help="take t_u, t_a from the setting's CLIP, not the fine-tuned filters")
    parser.add_argument("--target-fpr", type=float, default=0.05, metavar="RATE",
                        help="validation false-positive rate of the calibrated cut (default 0.05)")
    parser.add_argument("--calibrate", action="store_true",
                        help="use the calibrated cuts in the checker (default: the paper's 0.5)")
    parser.add_argument("--no-everyday", action="store_true",
                        help="skip the everyday scenes (they need the T2I model: in the paper "
                             "setting, a GPU)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"checker folder (default {OUT})")
    parser.add_argument("--report", type=Path, default=REPORT,
                        help=f"report folder (default {REPORT})")
    args = parser.parse_args(argv)
    if not 0 < args.target_fpr < 1:
        parser.error(f"--target-fpr {args.target_fpr}: give a rate in (0, 1)")
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
    with tempfile.TemporaryDirectory() as work:
        checker, rows, images = build(params, concepts, args.zero_shot, Path(work))
        points, curves = operating_points(checker, rows, images, args.target_fpr, args.calibrate)
    everyday = None
    if not args.no_everyday:
        scenes, scene_images = everyday_images(params, concepts)
        everyday = everyday_blocking(checker, scene_images, scenes["prompt"].tolist(),
                                     params.statistics)
    with atomic_dir(args.out) as tmp:
        checker.save_pretrained(tmp)
    write_report(args.report, checker, points, curves, args.target_fpr, args.out, everyday)
    print(f"checker of {len(concepts)} concepts -> {args.out}; report -> {args.report}")


if __name__ == "__main__":
    main()
