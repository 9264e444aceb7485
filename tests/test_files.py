"""Outputs are replaced atomically: an interrupted write leaves the previous result intact."""
import json

import pytest

from pipeline.espresso.files import atomic_dir, write_json


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary leftovers


def test_successful_folder_write_replaces_the_old_one(tmp_path):
    target = tmp_path / "model"
    for version in ("v1", "v2"):
        with atomic_dir(target) as tmp:
            (tmp / version).write_text(version)
    assert [p.name for p in target.iterdir()] == ["v2"]


def test_write_json_is_complete_or_absent(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # not serialisable: fails before replacing
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
