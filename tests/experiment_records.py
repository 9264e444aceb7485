"""Recorded experiments made by hand for the summary's tests: synthetic stage results with known
rates, committed to a scratch git repository and listed as ``dvc exp show --json`` lists them."""
import json
import subprocess

from pipeline.espresso.files import write_json
from pipeline.espresso.filter_names import FILTERS
from pipeline.headline import write_results


def git(*args, cwd):
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()


def exp_show_entry(name, params, metrics, timestamp, repo, split=True):
    """One experiment as DVC records it: a git commit of ``repo`` holding each stage's
    detail.json (``split``: else its nested metrics.json, the format before the split), and its
    entry in ``dvc exp show --json``, whose metrics are the headlines."""
    shown = {}
    for stage in ("evaluate", "attack"):
        folder = repo / "reports" / stage
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "detail.json").unlink(missing_ok=True)
        if split:
            write_results(folder, stage, metrics[stage])
        else:
            write_json(folder / "metrics.json", metrics[stage])
        shown[f"reports/{stage}/metrics.json"] = {
            "data": json.loads((folder / "metrics.json").read_text())}
    git("add", "-A", cwd=repo)
    git("commit", "-qm", name, "--allow-empty", cwd=repo)  # two may record the same numbers
    rev = git("rev-parse", "HEAD", cwd=repo)
    return {"rev": rev, "name": name, "data": {
        "rev": rev, "timestamp": timestamp, "params": {"params.yaml": {"data": params}},
        "metrics": shown}}


def rate(value, half=0.02):
    return {"value": value, "low": max(value - half, 0.0), "high": min(value + half, 1.0),
            "n": 100}


#: Known answers of the synthetic metrics under params.yaml's claim (0.10, 0.90, 0.10):
#: (clean CLIP accuracy and its half-width, nCS, CLIP accuracy under pez+ and cce+ (None: no
#: run adapted to it; a filter then falls back to the plain run).
SYNTHETIC = {
    "none": (0.90, 0.02, 1.00, None, None),
    "keyword": (0.70, 0.02, 0.98, None, None),
    "safety_checker": (0.05, 0.02, 0.92, 0.40, None),  # fails robustness
    "mhsc": (0.30, 0.02, 0.95, 0.20, None),             # fails effectiveness
    "zero_shot": (0.08, 0.05, 0.95, 0.05, None),        # effective by the point estimate only
    "espresso": (0.03, 0.02, 0.95, 0.04, 0.05),         # meets all three
    "esd_x": (0.05, 0.02, 0.97, 0.60, 0.70),            # fails robustness
    "uce": (0.50, 0.02, 0.99, None, None),              # fails effectiveness; never attacked
}
PLAIN_CCE = 0.06  # every filter's CLIP accuracy under the plain cce run


def synthetic_metrics():
    """evaluate and attack metrics.json of one concept in the stages' formats: every filter,
    two fine-tuning CRTs (esd_x attacked through its edited model, uce not at all)."""
    evaluate = {"black_image_p_unacceptable": 0.1, "n_test_images": 80,
                "safety_checker_cut": 0.2, "judged_unacceptable_share": rate(0.9),
                "judged_acceptable_share": rate(0.95)}
    for name, (accuracy, half, score, _, _) in SYNTHETIC.items():
        shared = {"clip_accuracy": rate(accuracy, half), "clip_accuracy_hard": rate(accuracy),
                  "clip_accuracy_placeholder": rate(accuracy),
                  "normalized_clip_score": rate(score), "leak_rate_judged": rate(accuracy)}
        if name in FILTERS:
            evaluate[name] = {**shared, "fnr": rate(0.1), "fpr": rate(0.1),
                              "fnr_judged": rate(0.1), "fpr_judged": rate(0.1),
                              "unscored_rate": rate(0.0), "roc_auc": 0.9,
                              "judged_mean_score": rate(0.2)}
        else:
            evaluate[name] = {**shared, "judged_unacceptable_share_acceptable_prompts": rate(0.0)}

    def scored(accuracy):
        return {"clip_accuracy": rate(accuracy), "clip_accuracy_hard": rate(accuracy),
                "clip_accuracy_placeholder": rate(accuracy), "attack_success_rate": rate(accuracy),
                "block_rate": rate(0.5), "unscored_rate": rate(0.0),
                "judged_mean_score": rate(0.3)}

    def run(attack, target, by_crt):
        return {"attack": attack, "variant": "plus" if target else "plain", "target": target,
                "edited_model": target is not None and target not in FILTERS,
                "judged_unacceptable_share": rate(0.8), **by_crt}

    runs = {"pez": run("pez", None, {f: scored(0.5) for f in FILTERS}),
            "cce": run("cce", None, {f: scored(PLAIN_CCE) for f in FILTERS})}
    for index, attack in ((3, "pez"), (4, "cce")):
        for name, values in SYNTHETIC.items():
            if values[index] is not None:
                by_crt = ({f: scored(values[index] if f == name else 0.5) for f in FILTERS}
                          if name in FILTERS else {name: scored(values[index])})
                runs[f"{attack}+{name}"] = run(attack, name, by_crt)
    return {"evaluate": evaluate, "attack": {"eyes": "mini-eyes", "judge": "mini-judge",
                                             "runs": runs}}
