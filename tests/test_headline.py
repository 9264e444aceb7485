"""Each stage's DVC metrics file is a short flat headline, a pure function of the detail beside it:
so DVC's views stay readable, and any metrics.json can be checked against its detail.json."""
import json
from pathlib import Path

import pytest
import yaml

from pipeline import headline
from pipeline.espresso.files import write_json

REPO = Path(__file__).resolve().parents[1]


def metric_stages() -> list[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return [name for name, stage in stages.items() if stage.get("metrics")]


def test_every_stage_with_metrics_has_a_headline_and_a_detail_output():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(metric_stages()) == sorted(headline.HEADLINES)
    for name in metric_stages():
        outs = [next(iter(out)) if isinstance(out, dict) else out for out in stages[name]["outs"]]
        assert f"reports/{name}/detail.json" in outs
        detail = next(out for out in stages[name]["outs"]
                      if isinstance(out, dict) and f"reports/{name}/detail.json" in out)
        assert detail[f"reports/{name}/detail.json"] == {"cache": False}  # committed in git


@pytest.mark.parametrize("stage", sorted(headline.HEADLINES))
def test_the_committed_headline_is_the_headline_of_the_committed_detail(stage):
    folder = REPO / "reports" / stage
    detail = json.loads((folder / "detail.json").read_text())
    expected = headline.headline(stage, detail)
    assert json.loads((folder / "metrics.json").read_text()) == expected
    assert 0 < len(expected) <= 30 and all(isinstance(v, (int, float)) for v in expected.values())
    assert all("{" not in key for key in expected)


def test_the_committed_headlines_fit_dvc_exp_show():
    """69 numbers in all (the everyday condition's 16 among them): with setting and concept, 73
    columns in `dvc exp show` when params and code columns are dropped as pipeline.headline's
    docstring shows; no stage adds numbers unnoticed."""
    total = sum(len(json.loads((REPO / "reports" / s / "metrics.json").read_text()))
                for s in headline.HEADLINES)
    assert total <= 69


def test_headline_rules_expand_crts_and_reduce_the_other_placeholders():
    detail = {
        "espresso": {"clip_accuracy": {"value": 0.1, "low": 0.0, "high": 0.2}},
        "none": {"clip_accuracy": {"value": 0.9}},  # a reference: no headline
        "esd_x": {"clip_accuracy": {"value": 0.5}},
        "outcomes": {"espresso": {"pez": {"clip_accuracy": {"value": 0.99}},  # plain: not adapted
                                  "pez+": {"clip_accuracy": {"value": 0.3}},
                                  "cce+": {"clip_accuracy": {"value": 0.4}}},
                     "esd_x": {"cce+": {"clip_accuracy": {"value": 0.7}}}},
        "heldout": {"a": 1.0, "b": {"c": 0.5, "d": 0.75}},
        "label": "text is no headline",
    }
    rules = {"test": [("clip_accuracy.{crt}", "{crt}.clip_accuracy.value", None),
                      ("worst.{crt}", "outcomes.{crt}.{attack}+.clip_accuracy.value", "max"),
                      ("heldout_min", "heldout.{name}", "min"),
                      ("absent", "nowhere", None)]}
    original = headline.HEADLINES
    headline.HEADLINES = rules
    try:
        assert headline.headline("test", detail) == {
            "clip_accuracy.espresso": 0.1, "clip_accuracy.esd_x": 0.5,
            "worst.espresso": 0.4, "worst.esd_x": 0.7, "heldout_min": 0.5}
        headline.HEADLINES = {"test": [("x", "heldout.{name}", None)]}
        with pytest.raises(ValueError, match="matches 3 numbers"):
            headline.headline("test", detail)
    finally:
        headline.HEADLINES = original


def test_write_results_writes_the_detail_and_its_headline(tmp_path):
    detail = json.loads((REPO / "reports" / "evaluate" / "detail.json").read_text())
    written = tmp_path / "written"
    written.mkdir()
    headline.write_results(written, "evaluate", detail)
    assert json.loads((written / "detail.json").read_text()) == detail
    assert json.loads((written / "metrics.json").read_text()) == headline.headline("evaluate",
                                                                                   detail)
    assert headline.mismatches(tmp_path) == []
    (tmp_path / "evaluate").mkdir()
    headline.write_results(tmp_path / "evaluate", "evaluate", detail)
    write_json(tmp_path / "evaluate" / "metrics.json", {"clip_accuracy.espresso": 0.5})
    assert headline.mismatches(tmp_path) == ["evaluate"]
