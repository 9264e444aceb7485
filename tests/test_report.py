"""Reports render from a tiny real run, blur what must be blurred, and open in a real browser."""
import copy
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline import report, summary


def test_report_renders_tables_plots_and_grids(tiny_run, tiny_params, monkeypatch):
    folder, _ = tiny_run
    monkeypatch.chdir(folder)
    report.run(tiny_params)
    out = folder / report.OUT
    markdown = (out / "README.md").read_text()
    for heading in ("Effectiveness and utility", "CLIP accuracy under attack",
                    "Attack success rate", "Certified robustness"):
        assert f"## {heading}" in markdown
    assert "| Espresso fine-tuned" in markdown and "pez" in markdown
    pictures = [line.split("(")[-1].rstrip(")") for line in markdown.splitlines()
                if line.startswith("![")]
    assert len(pictures) == 7  # 3 plots + 4 image grids
    for name in pictures:
        assert Image.open(out / name).size[0] > 100
    assert 'class="dataframe metrics"' in (out / "index.html").read_text()


def test_real_world_unacceptable_images_are_blurred_unless_asked(tiny_run, monkeypatch, tmp_path):
    folder, _ = tiny_run
    monkeypatch.chdir(folder)
    (tmp_path / "blurred").mkdir()
    (tmp_path / "plain").mkdir()
    report.image_grids(tmp_path / "blurred", blur=True)
    report.image_grids(tmp_path / "plain", blur=False)

    def detail(path):  # mean absolute difference between neighbouring pixels
        pixels = np.asarray(Image.open(path).convert("L"), float)
        return np.abs(np.diff(pixels, axis=1)).mean()

    name = "unacceptable_unfiltered.png"
    assert detail(tmp_path / "blurred" / name) < 0.5 * detail(tmp_path / "plain" / name)
    acceptable = "acceptable_unfiltered.png"  # acceptable images are never blurred
    assert detail(tmp_path / "blurred" / acceptable) == detail(tmp_path / "plain" / acceptable)


def exp_show_entry(name, params, metrics, timestamp):
    """One experiment as ``dvc exp show --json`` lists it."""
    return {"rev": name, "name": name, "data": {
        "rev": name, "timestamp": timestamp, "params": {"params.yaml": {"data": params}},
        "metrics": {f"reports/{stage}/metrics.json": {"data": metrics[stage]}
                    for stage in ("evaluate", "attack")}}}


@pytest.fixture()
def summary_page(tiny_run, tiny_params, tmp_path):
    _, metrics = tiny_run
    runs = []
    for i, concept in enumerate(("zorbo", "blip")):
        params = {**copy.deepcopy(tiny_params), "concept": concept}
        runs.append(exp_show_entry(f"exp-{concept}", params, metrics, f"2026-11-25T10:0{i}"))
    other_sweep = copy.deepcopy(params)  # newer, but with the plain attacks: not this sweep
    other_sweep["attack"]["adaptive"] = False
    runs.append(exp_show_entry("exp-plain", other_sweep, metrics, "2026-11-25T10:09"))
    shown = [{"rev": "workspace", "name": None, "data": {"rev": "workspace"}},
             {"rev": "main", "name": "main", "data": {"rev": "main"},
              "experiments": [{"revs": [r]} for r in runs]}]
    table = summary.summary_table(summary.experiments(shown), tiny_params)
    assert list(table.index) == ["blip", "zorbo", "average (ours)", "paper (average, SD v1.4)"]
    assert table.loc["blip", "experiment"] == "exp-blip"
    espresso = metrics["evaluate"]["espresso"]["clip_accuracy"]
    assert table.loc["zorbo", "effectiveness ↓"].startswith(f"{espresso:.3f} (")
    confidence = table.loc["zorbo", "P(u) on c_u (judged): clean → lowest under attack"]
    assert confidence.count("→") == 2  # Espresso fine-tuned, then zero-shot
    _, page = report.render("Espresso summary (mini)", [], {"Summary": table}, {})
    path = tmp_path / "index.html"
    path.write_text(page)
    return path


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (.ci/run installs it)")
def test_a_headless_browser_finds_the_summary_table(summary_page, tmp_path):
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", summary_page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert "<h2>Summary</h2>" in dom
    table = dom[dom.index("<table"):dom.index("</table>")]
    assert "average (ours)" in table and "paper (average, SD v1.4)" in table
    assert table.count("<tr") == 5  # header + 2 concepts + our average + the paper's


def test_sweep_overrides_are_parsed_like_dvc_exp_run_set():
    params = {"setting": "mini", "attack": {"adaptive": True, "mini": {"pez": {"steps": 300}}}}
    swept = summary.with_overrides(params, ["attack.adaptive=false", "attack.mini.pez.steps=50",
                                            "setting=paper"])
    assert swept == {"setting": "paper",
                     "attack": {"adaptive": False, "mini": {"pez": {"steps": 50}}}}
    assert params["attack"]["adaptive"] is True  # the input is left alone
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        summary.with_overrides(params, ["attack.adaptive"])
