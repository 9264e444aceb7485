"""``pipeline.export``'s everyday section: the whole checker's blocked share on scenes that name
none of its concepts (with its everyday anchors and by the paper's rule alone), and which concept
fired, each with its interval over prompts; the three disjoint everyday prompt sets; the report's
README (verdict first) and metrics.json. (Gathering experiments into a checker is run end to
end by ``tests/test_pipeline.py::test_dvc_repro_in_a_fresh_copy``.)"""
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import export
from pipeline.concepts import everyday_prompts, get_concept, names_concept
from pipeline.espresso import ConceptChecker
from pipeline.everyday_scenes import scene_rows, scene_seed
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
    cuts = {c.name: (c.cut, c.everyday_cut) for c in shipped.concepts}
    try:
        for c in shipped.concepts:
            c.cut = 1.0  # P(u|x) > 1: never
        quiet = export.everyday_blocking(shipped, images, prompts, stats)
        assert quiet["blocked_share"]["value"] == 0
        assert quiet["blocked_share_paper_rule"]["value"] == 0
        assert all(r["value"] == 0 for r in quiet["fired_share"].values())
        shipped.concept("kroll").cut = -1.0  # P(u|x) > -1: always, but the gate still decides
        gated = export.everyday_blocking(shipped, images, prompts, stats)
        assert gated["blocked_share_paper_rule"]["value"] == 1
        assert gated["fired_share_paper_rule"]["kroll"]["value"] == 1
        shipped.concept("kroll").everyday_cut = -1.0  # and its gate always opens
        loud = export.everyday_blocking(shipped, images, prompts, stats)
        assert loud["blocked_share"]["value"] == 1 and loud["fired_share"]["kroll"]["value"] == 1
        assert loud["blocked_share"]["low"] < 1 == loud["blocked_share"]["high"]  # an interval
        assert all(r["value"] == 0 for n, r in loud["fired_share"].items() if n != "kroll")
    finally:
        for c in shipped.concepts:
            c.cut, c.everyday_cut = cuts[c.name]


def test_the_report_opens_with_its_figure_and_verdict_and_holds_the_numbers(
        shipped, scenes, stats, tmp_path):
    images, prompts = scenes
    everyday = export.everyday_blocking(shipped, images, prompts, stats)
    rate = {"value": 0.1, "low": 0.0, "high": 0.3, "n": 10, "clusters": 5}
    rates = {name: {"test_auc": 1.0, "roc": {"fpr": [0, 1], "tpr": [0, 1]},
                    **{f"{m} ({rule})": rate for m in ("fnr", "fpr")
                       for rule in ("with anchors", "paper rule")}}
             for name in shipped.names}
    table = {"everyday": {**everyday["fired_share"], "any (blocked)": everyday["blocked_share"]}}
    export.write_report(tmp_path / "report", shipped, rates, table, everyday, None,
                        Path("data/checker"))
    readme = (tmp_path / "report" / "README.md").read_text()
    first = readme.split("\n\n")
    assert first[1] == "![everyday images and FNR per concept](everyday.png)"
    blocked = everyday["blocked_share"]
    assert first[2].startswith("- Everyday images blocked by the whole checker: "
                               f"{blocked['value']:.3f} [{blocked['low']:.3f}, "
                               f"{blocked['high']:.3f}] of 8 images (4 prompts")
    assert "Worst FNR on a concept's own test images: black_background 0.100" in first[2]
    assert "(above 0.05)" in first[2]
    assert "## Which concept fires on which images" in readme
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["everyday"]["blocked_share"] == blocked
    assert set(metrics["concepts"]) == set(shipped.names)
    assert (tmp_path / "report" / "everyday.png").stat().st_size > 1000
    export.write_report(tmp_path / "plain", shipped, rates, table, None, None,
                        Path("data/checker"))
    assert "Everyday images blocked" not in (tmp_path / "plain" / "README.md").read_text()


def test_everyday_sets_are_disjoint_and_the_test_set_is_the_everyday_stage_s(tiny_params):
    params = check_params(tiny_params)
    names = ["zorbo", "checkered", "black_background"]
    split = export.everyday_split(names, params, test=5, calibration=20, anchors=8)
    assert [len(split[k]) for k in ("test", "calibration", "anchors")] == [5, 20, 8]
    parts = [set(split[k]) for k in ("test", "calibration", "anchors")]
    assert sum(map(len, parts)) == len(set().union(*parts))  # no prompt in two parts
    assert not any(names_concept(p, get_concept(n, "mini"))
                   for part in parts for p in part for n in names)
    stage = everyday_prompts([get_concept(n, "mini") for n in names], 3, params.everyday.seed)
    assert split["test"][:3] == stage  # the everyday stage's prompts come first
    for name in names:  # the anchors' twins: each names its concept, none is an everyday text
        twins = split["in_context"][name]
        assert 0 < len(twins) <= 8 and len(set(twins)) == len(twins)
        assert all(names_concept(t, get_concept(name, "mini")) for t in twins)
        assert not set(twins) & set().union(*parts)
    rows = scene_rows(split["calibration"], params.everyday.seed, 1, first_index=5)
    assert rows["seed"].tolist() == [scene_seed(params.everyday.seed, 5 + i, 0)
                                     for i in range(20)]
