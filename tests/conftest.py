"""Shared fixtures: a scratch copy of the repository's data layout for stage tests, and tiny
random models in the paper setting's formats inside a fake, offline Hugging Face cache."""
import os
from pathlib import Path

import pytest
import yaml
from tiny_hub import build_hf_home, go_offline, save_local_models, tiny_clip

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
    params["generate"]["paper"].update(steps=2, size=32)
    params["finetune"].update(epochs=2, batch=4)
    params["attack"].update(targets=4, prompts=2, images_per_prompt=2)
    for setting in ("mini", "paper"):
        budgets = params["attack"][setting]
        for name in ("typo", "pez"):
            budgets[name].update(tokens=4, steps=5)
        budgets["cce"].update(steps=2, batch=2)
        budgets["ringbell"].update(tokens=4, population=8, generations=2)
    return params


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
