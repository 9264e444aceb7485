"""Shared fixtures: a scratch copy of the repository's data layout for stage tests, and tiny
random models in the paper setting's formats inside a fake, offline Hugging Face cache."""
import copy
import os

import pandas as pd
import pytest
from experiment_records import exp_show_entry, git, synthetic_metrics
from stages import make_stage_dir, run_all_stages, tiny_params_for
from tiny_hub import build_hf_home, go_offline, save_local_models, tiny_clip


@pytest.fixture()
def stage_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(make_stage_dir(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Every stage but the report run once with ``tiny_params`` (the smoke preset, on zorbo):
    (folder, metrics)."""
    folder = make_stage_dir(tmp_path_factory.mktemp("tiny_run"))
    here = os.getcwd()
    os.chdir(folder)
    try:
        metrics = run_all_stages(tiny_params_for())
    finally:
        os.chdir(here)
    return folder, metrics


@pytest.fixture()
def tiny_params():
    return tiny_params_for()


@pytest.fixture(scope="session")
def clip():
    """The tiny CLIP that the paper-format folders and hub cache hold."""
    return tiny_clip()


@pytest.fixture(scope="session")
def folders(tmp_path_factory, clip):
    """Local folders of tiny paper-format models (see ``tiny_hub.save_local_models``)."""
    root = tmp_path_factory.mktemp("models")
    save_local_models(root, clip)
    return root


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory, folders):
    return build_hf_home(tmp_path_factory.mktemp("hf_home"), folders)


@pytest.fixture
def offline_hub(monkeypatch, hf_home):
    """Offline, with the tiny models under the paper's hub ids in the cache."""
    go_offline(monkeypatch, hf_home)


@pytest.fixture
def offline_empty_hub(monkeypatch, tmp_path):
    """Offline, with an empty Hugging Face cache (no tiny models to build): every hub id is
    missing."""
    go_offline(monkeypatch, tmp_path / "hf_home")


@pytest.fixture()
def summary_folder(tiny_params, tmp_path, monkeypatch):
    """A summary written from three recorded experiments of synthetic results (two concepts, one
    of them recorded before results were split, and a newer one of another sweep): (folder,
    their results)."""
    from pipeline import experiments, summary
    from pipeline.headline import headline
    from pipeline.params import check_params

    metrics = synthetic_metrics()
    checked = check_params(tiny_params)  # from the repository root, where the concept registry is
    repo = tmp_path / "repo"  # the experiments' commits: the summary reads their detail.json
    repo.mkdir()
    git("init", "-q", cwd=repo)
    monkeypatch.chdir(repo)
    runs = []

    def tagged(i):  # the synthetic metrics, told apart by a number no table shows
        return {**metrics, "evaluate": {**metrics["evaluate"], "n_test_images": i}}

    for i, concept in enumerate(("zorbo", "blip")):
        params = {**copy.deepcopy(tiny_params), "concept": concept}
        runs.append(exp_show_entry(f"exp-{concept}", params, tagged(i), f"2026-11-25T10:0{i}",
                                   repo, split=concept == "zorbo"))  # blip: before the split
    other_sweep = copy.deepcopy(params)  # newer, but with the plain attacks: not this sweep
    other_sweep["attack"]["adapt_to"] = []
    runs.append(exp_show_entry("exp-plain", other_sweep, tagged(2), "2026-11-25T10:09", repo))
    shown = [{"rev": "workspace", "name": None, "data": {"rev": "workspace"}},
             {"rev": "main", "name": "main", "data": {"rev": "main"},
              "experiments": [{"revs": [r]} for r in runs]}]
    stricter = copy.deepcopy(tiny_params)  # the claim picks no stage's output: the same sweep
    stricter["summary"]["claim"]["clip_accuracy_max"] = 0.01
    recorded = experiments.experiments(shown)
    for i, run in enumerate(recorded):  # each experiment's own detail, from its commit
        assert run["detail"] == {stage: tagged(i)[stage] for stage in ("evaluate", "attack")}
    zorbo = next(run for run in recorded if run["name"] == "exp-zorbo")
    assert zorbo["metrics"]["reports/evaluate/metrics.json"] == headline("evaluate",
                                                                         metrics["evaluate"])
    chosen = experiments.newest_per_concept(recorded, stricter, ("evaluate", "attack"))
    assert {c: r["name"] for c, r in chosen.items()} == {"zorbo": "exp-zorbo", "blip": "exp-blip"}
    long = summary.with_averages(summary.long_table(chosen))
    summary.write_summary(tmp_path / "summary", checked, [], long,
                          pd.DataFrame(), pd.DataFrame())  # no ablation, no probe
    return tmp_path / "summary", metrics
