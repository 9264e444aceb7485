"""``pipeline.export``'s everyday section: the whole checker's blocked share on scenes that name
none of its concepts, and which concept fired, each with its interval over prompts; written to
the report's README table and metrics.json. (Gathering experiments into a checker is run end to
end by ``tests/test_pipeline.py::test_dvc_repro_in_a_fresh_copy``.)"""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import export
from pipeline.concepts import get_concept, names_concept
from pipeline.espresso import ConceptChecker
from pipeline.everyday_scenes import scene_seed
from pipeline.mini import shapes
from pipeline.params import check_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    """The shipped six-concept checker (a fresh copy per module: tests change its cuts)."""
    return ConceptChecker.from_pretrained(REPO / "data" / "checker", device="cpu")


@pytest.fixture(scope="module")
def scenes():
    """Rendered scenes of no character on a grey background, two per 'prompt'."""
    rng = np.random.default_rng(3)
    images = shapes.render_many([shapes.sample_scene(rng, character_prob=0.0, background="gray")
                                 for _ in range(8)], rng)
    return images, [f"prompt {i // 2}" for i in range(8)]


@pytest.fixture()
def stats(tiny_params):
    return check_params(tiny_params).statistics


def test_the_blocked_share_is_any_concept_firing(shipped, scenes, stats):
    images, prompts = scenes
    result = shipped.check(images)
    out = export.everyday_blocking(shipped, images, prompts, stats)
    assert out["n_images"] == 8 and out["n_prompts"] == 4 and out["unscored"] == 0
    assert out["prompts"] == [f"prompt {i}" for i in range(4)]
    assert out["blocked_share"]["value"] == pytest.approx(result.blocked.mean())
    assert out["blocked_share"]["clusters"] == 4
    assert list(out["fired_share"]) == shipped.names
    for k, name in enumerate(shipped.names):
        assert out["fired_share"][name]["value"] == pytest.approx(result.fired[:, k].mean())


def test_known_answers_a_concept_that_always_fires_and_none_that_does(shipped, scenes, stats):
    images, prompts = scenes
    cuts = {c.name: c.cut for c in shipped.concepts}
    try:
        for c in shipped.concepts:
            c.cut = 1.0  # P(u|x) > 1: never
        quiet = export.everyday_blocking(shipped, images, prompts, stats)
        assert quiet["blocked_share"]["value"] == 0
        assert all(r["value"] == 0 for r in quiet["fired_share"].values())
        shipped.concept("kroll").cut = -1.0  # P(u|x) > -1: always
        loud = export.everyday_blocking(shipped, images, prompts, stats)
        assert loud["blocked_share"]["value"] == 1 and loud["fired_share"]["kroll"]["value"] == 1
        assert loud["blocked_share"]["low"] < 1 == loud["blocked_share"]["high"]  # an interval
        assert all(r["value"] == 0 for n, r in loud["fired_share"].items() if n != "kroll")
    finally:
        for c in shipped.concepts:
            c.cut = cuts[c.name]


def test_the_report_holds_the_everyday_table_and_numbers(shipped, scenes, stats, tmp_path,
                                                         monkeypatch):
    images, prompts = scenes
    everyday = export.everyday_blocking(shipped, images, prompts, stats)
    rates = {"fpr": {"value": 0.0, "low": 0.0, "high": 0.1, "n": 10},
             "fnr": {"value": 0.0, "low": 0.0, "high": 0.1, "n": 10}}
    points = {name: {"cut_in_checker": 0.5, "calibrated_cut": 0.4,
                     "validation_fpr_at_calibrated_cut": 0.05, "test_auc": 1.0,
                     "test_at_0.5": rates, "test_at_calibrated_cut": rates}
              for name in shipped.names}
    monkeypatch.setattr(export, "roc_figure", lambda *args: SimpleNamespace(
        savefig=lambda path, dpi: Path(path).write_bytes(b"png")))
    export.write_report(tmp_path / "report", shipped, points, {}, 0.05, Path("data/checker"),
                        everyday)
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "## Everyday scenes" in readme and "8 images of 4 prompts" in readme
    blocked = everyday["blocked_share"]
    assert re.search(r"\| whole checker: blocked\s*\| "
                     + re.escape(f"{blocked['value']:.3f} [{blocked['low']:.3f}, "
                                 f"{blocked['high']:.3f}]"), readme), readme
    assert all(f"| {name} fired" in readme for name in shipped.names)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics) == {*shipped.names, "everyday"}
    assert metrics["everyday"]["blocked_share"] == blocked
    export.write_report(tmp_path / "plain", shipped, points, {}, 0.05, Path("data/checker"))
    assert "Everyday" not in (tmp_path / "plain" / "README.md").read_text()
    assert set(json.loads((tmp_path / "plain" / "metrics.json").read_text())) == set(points)


@pytest.mark.slow
def test_everyday_scenes_are_rendered_by_the_unedited_model_with_their_seeds(tiny_params):
    tiny_params["everyday"] = {**tiny_params["everyday"], "prompts": 2, "images_per_prompt": 2}
    params = check_params(tiny_params)
    names = ["zorbo", "checkered", "black_background"]
    scenes, images = export.everyday_images(params, names)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert not any(names_concept(p, get_concept(n, "mini"))
                   for p in scenes["prompt"] for n in names)
    assert scenes["seed"].tolist() == [scene_seed(params.everyday.seed, i, j)
                                       for i in range(2) for j in range(2)]
    again, images_again = export.everyday_images(params, names)
    assert np.array_equal(images, images_again)  # the seeds make the images
