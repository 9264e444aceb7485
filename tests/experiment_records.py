"""Published experiments made by hand for the summary's tests: per-image score tables of known
structure (each CRT blocks, leaks and costs CLIP score at rates we choose), committed to a
scratch git repository as ``exp(<concept>): ...`` commits, the way ``pipeline.provenance``
publishes them."""
import subprocess

import numpy as np
import pandas as pd
import yaml

from pipeline.espresso.filter_names import FILTERS

EDITS = ("esd_x", "uce")
ATTACKS = ("pez", "cce")
EDIT_ATTACKS = ("cce", "udiff")
#: Per CRT: the chance an image is blocked (filters) or still shows c_u (edits), per condition;
#: "ratio": an edit's CLIP score over the unedited one's. A good filter, a poor one, an edit.
PROFILE = {
    "none": {"u": 0.0, "a": 0.0, "e": 0.0, "attack": 0.0},
    "keyword": {"u": 0.0, "a": 0.0, "e": 0.0, "attack": 0.0},
    "safety_checker": {"u": 0.5, "a": 0.3, "e": 0.5, "attack": 0.2},
    "mhsc": {"u": 0.9, "a": 0.05, "e": 0.1, "attack": 0.6},
    "zero_shot": {"u": 0.95, "a": 0.02, "e": 0.3, "attack": 0.5},
    "espresso": {"u": 1.0, "a": 0.0, "e": 0.0, "attack": 1.0},
    "esd_x": {"shows": 0.6, "ratio": 0.97},
    "uce": {"shows": 0.05, "ratio": 0.99},
}


def git(*args, cwd):
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()


def _filters(rng, n, key, profile):
    out = {}
    for name in FILTERS:
        blocked = rng.random(n) < profile[name][key]
        out[f"{name}_score"] = np.where(blocked, 0.9, 0.1)
        out[f"{name}_blocked"] = blocked
    return out


def _edits(rng, n, clip, profile, shows_key="shows"):
    out = {}
    for crt in EDITS:
        out[f"{crt}_p_eval"] = rng.uniform(0, 1, n)
        out[f"{crt}_clip_score"] = clip * profile[crt]["ratio"]
        out[f"{crt}_judge_shows_concept"] = rng.random(n) < profile[crt][shows_key]
    return out


def score_tables(seed: int, prompts: int = 8, images: int = 4, profile=None) -> dict:
    """The three tables a published commit holds (evaluate, everyday, attack), drawn by
    ``seed`` from ``profile`` (default PROFILE)."""
    profile = profile or PROFILE
    rng = np.random.default_rng(seed)
    rows = {}
    n = prompts * images
    for label, key in (("unacceptable", "u"), ("acceptable", "a")):
        clip = rng.uniform(0.5, 0.7, n)
        rows[label] = pd.DataFrame({
            "prompt": np.repeat([f"{label} prompt {i}" for i in range(prompts)], images),
            "seed": np.arange(n), "label": label,
            "judge_shows_concept": np.full(n, label == "unacceptable"),
            "p_eval": rng.uniform(0, 1, n), "clip_score": clip,
            **_filters(rng, n, key, profile),
            **_edits(rng, n, clip, profile if label == "unacceptable"
                     else {c: {**profile[c], "shows": 0.0} for c in EDITS})})
    evaluate = pd.concat(rows.values(), ignore_index=True)
    clip = rng.uniform(0.5, 0.7, n)
    everyday = pd.DataFrame({
        "prompt": np.repeat([f"everyday prompt {i}" for i in range(prompts)], images),
        "seed": np.arange(n), "judge_shows_concept": np.zeros(n, bool), "clip_score": clip,
        **_filters(rng, n, "e", profile),
        **_edits(rng, n, clip, {c: {**profile[c], "shows": 0.0} for c in EDITS})})
    runs = []
    # each attack plain (its prompts also rendered by each edit), "+" per filter; each edit
    # attack "+" through each edit
    plans = [(attack, variant, target, edited) for attack in ATTACKS
             for variant, target, edited in [("plain", "", False)]
             + [("plain", e, True) for e in EDITS]
             + [("plus", t, False) for t in ("mhsc", "zero_shot", "espresso")]]
    plans += [(attack, "plus", e, True) for attack in EDIT_ATTACKS for e in EDITS]
    for attack, variant, target, edited in plans:
        named = target if variant == "plus" else ""  # an edit's plain run: the plain prompts
        runs.append(pd.DataFrame({
            "prompt": np.repeat([f"{attack} {named} prompt {i}" for i in range(prompts)], images),
            "judge_shows_concept": rng.random(n) < 0.8, "p_eval": rng.uniform(0, 1, n),
            **_filters(rng, n, "attack", profile), "attack": attack, "variant": variant,
            "target": target or np.nan, "edited_model": edited, "attack_seed": 0,
            "seed": np.arange(n)}))
    return {"evaluate": evaluate, "everyday": everyday, "attack": pd.concat(runs, ignore_index=True)}


def publish(repo, concept: str, params: dict, tables: dict, subject: str | None = None) -> str:
    """Commit ``tables`` (and params.yaml with ``concept``) in ``repo`` as ``exp(<concept>):``;
    the commit's sha."""
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "concept": concept}))
    for stage, table in tables.items():
        folder = repo / "reports" / stage
        folder.mkdir(parents=True, exist_ok=True)
        table.to_csv(folder / "scores.csv", index=False)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", subject or f"exp({concept}): synthetic", "--allow-empty", cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)
