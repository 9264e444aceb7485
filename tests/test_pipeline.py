"""The pipeline as users run it: stages end to end in-process (deterministic), and `dvc repro`
in a temporary copy of the repository with tiny budgets."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import evaluate, finetune, generate

REPO = Path(__file__).resolve().parents[1]


def _run_all(params):
    generate.run(params)
    finetune.run(params)
    return evaluate.run(params)


def test_same_params_give_the_same_metrics(stage_dir, tiny_params):
    first = _run_all(tiny_params)
    shutil.rmtree(stage_dir / "data/generate")
    second = _run_all(tiny_params)
    assert first == second
    assert set(evaluate.FILTERS) <= set(first)
    for name in evaluate.FILTERS:
        for key in ("clip_accuracy", "normalized_clip_score", "block_rate", "roc_auc"):
            assert 0.0 <= first[name][key] <= 1.0 + 1e-6, (name, key)
    assert first["none"]["block_rate"] == 0.0 and first["none"]["normalized_clip_score"] == 1.0


def test_unknown_concept_stops_the_stage_with_the_known_ones(stage_dir, tiny_params):
    tiny_params["concept"] = "garfield"
    with pytest.raises(SystemExit, match="known: black_background"):
        from pipeline.params import run_stage

        (stage_dir / "params.yaml").write_text(yaml.safe_dump(tiny_params))
        run_stage(generate.run, stage_dir / "params.yaml")


def test_dvc_repro_in_a_fresh_copy(tmp_path, tiny_params):
    copy = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    (copy / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "site")}
    dvc = [sys.executable, "-m", "dvc"]

    def sh(*cmd):
        result = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    sh("git", "init", "-q")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "fixture")
    sh(*dvc, "repro")
    metrics = json.loads((copy / "reports/evaluate/metrics.json").read_text())
    assert metrics["espresso"]["block_rate"] >= 0.0 and metrics["n_test_images"] == 8
    assert "up to date" in sh(*dvc, "repro").lower() or "didn't change" in sh(*dvc, "status")
