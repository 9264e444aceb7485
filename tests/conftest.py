"""Shared fixtures: a scratch copy of the repository's data layout for stage tests, and tiny
random models in the paper setting's formats inside a fake, offline Hugging Face cache."""
import os

import pandas as pd
import pytest
from experiment_records import score_tables
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
def summary_folder(tiny_params, tmp_path):
    """A summary written from three concepts' synthetic score tables (known per-CRT rates,
    ``experiment_records.PROFILE``): (folder, the tables)."""
    from pipeline import summary
    from pipeline.params import check_params

    checked = check_params(tiny_params)
    tables = {concept: score_tables(seed, prompts=16, images=2)
              for seed, concept in enumerate(("zorbo", "blip", "mimi"))}
    long, claims = summary.long_table(tables, checked.statistics,
                                      {c: f"{i:040d}" for i, c in enumerate(tables)})
    index = pd.DataFrame([{"concept": c, "commit": f"{i:040d}", "subject": f"exp({c}): synthetic",
                           "date": "2026-12-06"} for i, c in enumerate(tables)])
    summary.write_summary(tmp_path / "summary", checked, long, claims, index,
                          summary.curves_table(tables, checked.statistics))
    return tmp_path / "summary", tables
