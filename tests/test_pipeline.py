"""The pipeline as users run it: stages end to end in-process (deterministic), and `dvc repro`
in a temporary copy of the repository with tiny budgets."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages import run_all_stages, wiring_params_for
from pipeline import generate
from pipeline.attack import attack_runs
from pipeline.espresso.filter_names import FILTERS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_same_params_give_the_same_metrics(tiny_run, stage_dir, tiny_params):
    _, first = tiny_run
    second = run_all_stages(tiny_params)  # from scratch, in another folder
    assert first == second
    evaluated, attacked = first["evaluate"], first["attack"]
    edits, a = tiny_params["edit"]["crts"], tiny_params["attack"]
    runs = [run for run, *_ in attack_runs(a["attacks"], a["adapt_to"], edits, a["edit_attacks"])]
    # each attack plain, its prompts through each edit, "+" per filter, then each edit attack
    assert list(attacked["runs"]) == runs
    assert attacked["runs"]["pez+espresso"]["target"] == "espresso"
    assert attacked["runs"]["udiff+uce"]["edited_model"]
    assert attacked["eyes"] == tiny_params["models"]["mini"]["eyes"]
    scores = pd.read_csv(stage_dir / "reports/attack/scores.csv")
    assert sorted(scores["attack_seed"].unique()) == list(range(a["seeds"]))
    # the curve's images: below the full budget the first of each prompt's image seeds only,
    # and at the full budget those same seeds are the ones marked on the curve
    images = scores.groupby(["attack", "variant", "target", "attack_seed", "budget"],
                            dropna=False).size()
    for (*run, budget), count in images.items():
        assert count == a["prompts"] * (a["images_per_prompt"] if budget == 1.0
                                        else a["curve_images_per_prompt"])
    full = scores[scores["budget"] == 1.0]
    assert full["on_curve"].sum() * a["images_per_prompt"] == \
        len(full) * a["curve_images_per_prompt"]
    assert set(scores[scores["budget"] < 1.0]["seed"]) <= set(full[full["on_curve"]]["seed"])
    outcomes = attacked["outcomes"]
    for name in FILTERS:
        for key in ("clip_accuracy", "normalized_clip_score", "fnr", "fpr", "fnr_judged",
                    "unscored_rate"):
            rate = evaluated[name][key]  # every rate carries its 95% interval
            assert 0.0 <= rate["low"] <= rate["value"] <= rate["high"] <= 1.0 + 1e-6, (name, key)
        assert evaluated[name]["unscored_rate"]["value"] == 0.0
        for attack in a["attacks"]:  # plain, scored by every filter
            success = outcomes[name][attack]["attack_success"]
            assert 0.0 <= success["low"] <= success["value"] <= success["high"] <= 1.0
    for crt in edits:  # a fine-tuning CRT blocks nothing: scored as its own unfiltered model
        for key in ("clip_accuracy", "normalized_clip_score", "leak_rate_judged"):
            rate = evaluated[crt][key]
            # an edited model's image can score above the unedited one's: nCS may exceed 1
            top = np.inf if key == "normalized_clip_score" else 1.0 + 1e-6
            assert 0.0 <= rate["low"] <= rate["value"] <= rate["high"] <= top, (crt, key)
        # every edit: the plain condition and at least two attacks through its own model
        assert set(a["attacks"]) <= set(outcomes[crt])
        assert {f"{name}+" for name in a["edit_attacks"]} <= set(outcomes[crt])
        assert len(a["edit_attacks"]) >= 2
    certified = first["certify"]
    assert certified["total_violations"] == 0  # the certificate held on every test image
    assert set(certified["espresso"]["attacks"]) == set(runs)
    assert evaluated["none"]["fnr"]["value"] == 1.0 and evaluated["none"]["fpr"]["value"] == 0.0
    assert evaluated["none"]["normalized_clip_score"]["value"] == 1.0


def test_unknown_concept_stops_the_stage_with_the_known_ones(stage_dir, tiny_params):
    tiny_params["concept"] = "garfield"
    with pytest.raises(SystemExit, match="known: black_background"):
        from pipeline.params import run_stage

        (stage_dir / "params.yaml").write_text(yaml.safe_dump(tiny_params))
        run_stage(generate.run, argv=[], path=stage_dir / "params.yaml")


@pytest.mark.slow
def test_dvc_repro_in_a_fresh_copy(tmp_path):
    tiny_params = wiring_params_for()  # three whole runs and an export: the fewest runs
    copy = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():  # the mini SD's text side links to the CLIP folder
            (copy / name).symlink_to(os.readlink(REPO / name))
        elif (REPO / name).is_file():
            shutil.copy2(REPO / name, copy / name)
    (copy / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    # stage commands say `python`: the one of this environment, as for a user with it activated
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "site")}
    dvc = [sys.executable, "-m", "dvc"]

    def sh(*cmd, cwd=copy):
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    sh("git", "init", "-q")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "fixture")
    first = sh(*dvc, "repro")
    for stage in ("generate", "finetune", "edit", "evaluate", "attack", "certify"):
        assert f"Running stage '{stage}'" in first
    assert "Running stage 'world'" not in first  # frozen: the shipped models are used as-is
    detail = json.loads((copy / "reports/evaluate/detail.json").read_text())
    assert detail["n_test_images"] == 8 and set(FILTERS) <= set(detail)
    headline = json.loads((copy / "reports/evaluate/metrics.json").read_text())
    assert headline["clip_accuracy.espresso"] == detail["espresso"]["clip_accuracy"]["value"]
    assert "Running stage" not in sh(*dvc, "repro")  # nothing changed: nothing reruns
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "zorbo results")
    sh(*dvc, "remote", "add", "-d", "shared", str(tmp_path / "remote"))  # a shared DVC cache
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "DVC remote",
       ".dvc/config")

    sh(*dvc, "exp", "run", "-S", "concept=blip")  # a concept sweep, as users run it
    shown = json.loads(sh(*dvc, "exp", "show", "--json"))
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    runs = [r["revs"][0]["data"] for r in experiments if r.get("revs")]
    concepts = {r["params"]["params.yaml"]["data"]["concept"] for r in runs}
    assert "blip" in concepts
    blip = next(r for r in runs if r["params"]["params.yaml"]["data"]["concept"] == "blip")
    assert "clip_accuracy.espresso" in blip["metrics"]["reports/evaluate/metrics.json"]["data"]
    committed = json.loads(sh("git", "show", f"{blip['rev']}:reports/evaluate/detail.json"))
    assert "espresso" in committed  # an experiment's detail is committed in it

    # the deployable checker, gathered from the workspace's concept and the experiment's
    sh(sys.executable, "-m", "pipeline.export", "--concepts", "zorbo", "blip", "--calibrate",
       "--target-fpr", "0.25", "--test-prompts", "3", "--calibration-prompts", "40",
       "--anchor-texts", "8", "--everyday-fpr", "0.05")
    table = json.loads((copy / "data/checker/config.json").read_text())["concept_table"]
    assert [row["name"] for row in table] == ["zorbo", "blip"]
    sources = {row["name"]: row["provenance"] for row in table}
    assert sources["blip"]["experiment"] not in ("workspace", "main", "master")
    assert sources["zorbo"]["params"]["finetune"] == tiny_params["finetune"]
    assert all(row["calibration"]["target_fpr"] == 0.25 for row in table)
    assert all(row["everyday"]["calibration"]["groups"] == 40 for row in table)
    points = json.loads((copy / "reports/checker/metrics.json").read_text())
    assert set(points) == {"concepts", "confusion", "everyday", "everyday_calibration"}
    assert set(points["concepts"]) == {"zorbo", "blip"}
    assert (copy / "reports/checker/everyday.png").is_file()
    assert points["everyday"]["blocked_share"]["n"] == 6  # smoke: 3 everyday prompts x 2 images
    missing = subprocess.run([sys.executable, "-m", "pipeline.export", "--concepts", "kroll",
                              "--out", "data/checker-kroll"], cwd=copy, env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "no experiment" in missing.stderr and "concept=NAME" in missing.stderr
    assert not (copy / "data/checker-kroll").exists()

    # The reviewer's path, exactly as the README's "Reviewer workflow" gives it: a second concept
    # experiment; one experiment becomes a branch and an annotated tag; a fresh clone checks the
    # tag out and shows the same metrics; the two experiments compared in numbers and plots.
    sh(*dvc, "exp", "run", "-S", "concept=kroll")
    shown = json.loads(sh(*dvc, "exp", "show", "--json"))
    recorded = {r["data"]["params"]["params.yaml"]["data"]["concept"]: r for rev in shown
                for e in rev.get("experiments") or [] for r in e["revs"]}
    blip, kroll = recorded["blip"]["name"], recorded["kroll"]["name"]
    sh(*dvc, "exp", "branch", blip, "result/blip")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "tag", "-a", "blip-v1", "result/blip",
       "-m", "blip, tiny budgets")
    sh(*dvc, "push", "--all-branches")  # the tagged branch's data, to the shared cache
    fresh = tmp_path / "fresh"
    sh("git", "clone", "-q", str(copy), str(fresh))
    sh("git", "checkout", "-q", "blip-v1", cwd=fresh)
    sh(*dvc, "pull", cwd=fresh)
    assert "up to date" in sh(*dvc, "status", cwd=fresh)  # the exact data of the experiment
    (cloned,) = json.loads(sh(*dvc, "metrics", "show", "--json", cwd=fresh)).values()
    expected = {path: m["data"] for path, m in recorded["blip"]["data"]["metrics"].items()}
    assert {path: m["data"] for path, m in cloned["data"].items()} == expected
    assert yaml.safe_load((fresh / "params.yaml").read_text())["concept"] == "blip"
    diff = json.loads(sh(*dvc, "metrics", "diff", blip, kroll, "--json"))
    changed = diff["reports/evaluate/metrics.json"]
    assert changed  # two concepts: their headline rates differ
    blip_rates = expected["reports/evaluate/metrics.json"]
    assert all(change["old"] == blip_rates[key] for key, change in changed.items())
    sh(*dvc, "plots", "diff", blip, kroll, "-o", "compared")
    page = (copy / "compared" / "index.html").read_text()
    assert blip in page and kroll in page  # both experiments' curves, in each plot:
    assert "Certified accuracy" in page and "reports/finetune/history.csv" in page
