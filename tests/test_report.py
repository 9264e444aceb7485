"""Reports render from a tiny real run, blur what must be blurred, and open in a real browser."""
import copy
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import report, summary


def test_report_renders_tables_plots_and_grids(tiny_run, tiny_params, monkeypatch):
    folder, _ = tiny_run
    monkeypatch.chdir(folder)
    report.run(tiny_params)
    out = folder / report.OUT
    markdown = (out / "README.md").read_text()
    for heading in ("Effectiveness and utility", "Error rates", "CLIP accuracy under attack",
                    "Attack success rate", "Certified robustness"):
        assert f"## {heading}" in markdown
    assert "| Espresso fine-tuned" in markdown and "pez" in markdown
    pictures = [line.split("(")[-1].rstrip(")") for line in markdown.splitlines()
                if line.startswith("![")]
    assert len(pictures) == 7  # 3 plots + 4 image grids
    for name in pictures:
        assert Image.open(out / name).size[0] > 100
    assert 'class="dataframe metrics"' in (out / "index.html").read_text()
    assert "exact by algebra" in markdown and " [" in markdown  # scope stated; intervals shown


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
def summary_folder(tiny_run, tiny_params, tmp_path):
    _, metrics = tiny_run
    runs = []
    for i, concept in enumerate(("zorbo", "blip")):
        params = {**copy.deepcopy(tiny_params), "concept": concept}
        runs.append(exp_show_entry(f"exp-{concept}", params, metrics, f"2026-11-25T10:0{i}"))
    other_sweep = copy.deepcopy(params)  # newer, but with the plain attacks: not this sweep
    other_sweep["attack"]["adapt_to"] = []
    runs.append(exp_show_entry("exp-plain", other_sweep, metrics, "2026-11-25T10:09"))
    shown = [{"rev": "workspace", "name": None, "data": {"rev": "workspace"}},
             {"rev": "main", "name": "main", "data": {"rev": "main"},
              "experiments": [{"revs": [r]} for r in runs]}]
    chosen = summary.newest_per_concept(summary.experiments(shown), tiny_params,
                                        ("evaluate", "attack"))
    assert {c: r["name"] for c, r in chosen.items()} == {"zorbo": "exp-zorbo", "blip": "exp-blip"}
    long = summary.with_averages(summary.long_table(chosen))
    summary.write_summary(tmp_path / "summary", tiny_params, [], long, pd.DataFrame(),
                          pd.DataFrame())  # no ablation, no probe
    return tmp_path / "summary", metrics


def test_summary_is_data_one_row_per_concept_filter_condition_metric(summary_folder):
    folder, metrics = summary_folder
    data = pd.read_csv(folder / "summary.csv")
    assert list(data.columns) == ["concept", "filter", "condition", "run", "metric", "value",
                                  "low", "high", "n", "experiment"]
    assert not data.duplicated(["concept", "filter", "condition", "metric"]).any()
    row = data[(data["concept"] == "zorbo") & (data["filter"] == "espresso")
               & (data["condition"] == "clean") & (data["metric"] == "fpr_judged")].iloc[0]
    expected = metrics["evaluate"]["espresso"]["fpr_judged"]
    assert (row["value"], row["low"], row["high"]) == pytest.approx(
        (expected["value"], expected["low"], expected["high"]))
    pez = data[(data["concept"] == "average") & (data["filter"] == "none")
               & (data["condition"] == "pez") & (data["metric"] == "attack_success_rate")]
    assert len(pez) == 1 and pez["low"].iloc[0] <= pez["value"].iloc[0] <= pez["high"].iloc[0]
    # "pez+" is read from the run adapted to each filter, the plain run where there is none
    success = data[(data["concept"] == "zorbo") & (data["condition"] == "pez+")
                   & (data["metric"] == "attack_success_rate")].set_index("filter")
    runs = metrics["attack"]["runs"]
    for f, run in (("espresso", "pez+espresso"), ("zero_shot", "pez+zero_shot"),
                   ("threshold", "pez"), ("none", "pez")):
        assert success.loc[f, "run"] == run
        assert success.loc[f, "value"] == pytest.approx(runs[run][f]["attack_success_rate"]["value"])
    markdown = (folder / "README.md").read_text()
    assert "paper (Espresso, SD v1.4, its concepts)" in markdown
    assert "differ beyond their 95% intervals" in markdown
    assert "exact by algebra" in markdown  # the certificate's honest scope
    assert (folder / "summary.png").stat().st_size > 10_000
    main = markdown[markdown.index("## Main table, under the attacks"):]
    main = main[:main.index("\n## ")]
    rows = {line.split("|")[1].strip(): line for line in main.splitlines()[4:]}
    assert report.PLAIN_MARK in rows["cosine threshold (SD-checker style)"]
    assert report.PLAIN_MARK not in rows["Espresso fine-tuned"]  # its own adapted runs


def test_summary_averages_combine_the_concepts_intervals():
    long = pd.DataFrame([
        {"concept": c, "filter": "espresso", "condition": "clean", "run": "", "metric": "fnr",
         "value": v, "low": v - 0.1, "high": v + 0.1, "n": 100, "experiment": c}
        for c, v in (("a", 0.2), ("b", 0.4))])
    average = summary.with_averages(long).iloc[-1]
    half = 1.959964 * np.sqrt(2 * (0.1 / 1.959964) ** 2) / 2  # sqrt(sum se^2) / k
    assert average["concept"] == "average" and average["value"] == pytest.approx(0.3)
    assert (average["low"], average["high"]) == pytest.approx((0.3 - half, 0.3 + half))


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (.ci/run installs it)")
def test_the_summary_page_fits_a_browser_window(summary_folder, tmp_path):
    folder, _ = summary_folder
    page = (folder / "index.html").read_text()
    probe = tmp_path / "probe.html"  # the page, plus a script that records whether it overflows
    probe.write_text(page.replace("</body>", "<script>document.body.dataset.overflow = "
                                  "document.documentElement.scrollWidth > innerWidth;</script></body>"))
    shutil.copy(folder / "summary.png", tmp_path / "summary.png")
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
         "--disable-background-networking", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-overflow="false"' in dom
    main = dom[dom.index("<table"):dom.index("</table>")]  # the paper's layout: a row per filter
    assert main.count("<tr") == 7 and "paper: Espresso (SD v1.4, its concepts)" in main
    effectiveness = dom[dom.index("<h2>CLIP accuracy on unacceptable prompts"):]
    table = effectiveness[effectiveness.index("<table"):effectiveness.index("</table>")]
    assert "average (ours)" in table and "paper (Espresso, SD v1.4, its concepts)" in table
    assert table.count("<tr") == 5  # header + 2 concepts + our average + the paper's


def test_sweep_overrides_are_parsed_like_dvc_exp_run_set():
    params = {"setting": "mini", "attack": {"adapt_to": ["espresso"],
                                            "mini": {"pez": {"steps": 300}}}}
    swept = summary.with_overrides(params, ["attack.adapt_to=[]", "attack.mini.pez.steps=50",
                                            "setting=paper"])
    assert swept == {"setting": "paper", "attack": {"adapt_to": [], "mini": {"pez": {"steps": 50}}}}
    assert params["attack"]["adapt_to"] == ["espresso"]  # the input is left alone
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        summary.with_overrides(params, ["attack.adapt_to"])


def test_attack_conditions_read_x_plus_from_the_run_adapted_to_each_filter():
    def run(attack, target=None):
        return {"attack": attack, "variant": "plus" if target else "plain", "target": target}

    attack = {"runs": {"pez": run("pez"), "cce": run("cce"), "pez+espresso": run("pez", "espresso"),
                       "pez+zero_shot": run("pez", "zero_shot")}}
    conditions = report.attack_conditions(attack)
    assert list(conditions) == ["pez+", "pez", "cce"]  # cce has no "+" run
    assert conditions["pez+"] == {"none": "pez", "keyword": "pez", "threshold": "pez",
                                  "zero_shot": "pez+zero_shot", "espresso": "pez+espresso"}
    assert set(conditions["pez"].values()) == {"pez"}
    assert report.is_plain_fallback("pez+", "pez") and not report.is_plain_fallback("pez", "pez")
