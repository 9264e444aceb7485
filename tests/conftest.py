"""Shared fixtures: a scratch copy of the repository's data layout for stage tests."""
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def stage_dir(tmp_path, monkeypatch):
    """A working directory where stages can run: the shipped world and registry linked in,
    and ``tiny_params`` with CPU-sized budgets. Stages write only inside it."""
    (tmp_path / "data").mkdir()
    os.symlink(REPO / "data" / "world", tmp_path / "data" / "world")
    os.symlink(REPO / "data" / "concepts.yaml", tmp_path / "data" / "concepts.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def tiny_params():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generate"].update(prompts={"train": 4, "val": 2, "test": 2},
                              images_per_prompt={"train": 1, "val": 2, "test": 2}, shard_size=8)
    params["generate"]["mini"].update(steps=4)
    params["finetune"].update(epochs=2, batch=4)
    return params
