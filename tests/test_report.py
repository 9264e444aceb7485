"""Reports render from a tiny real run, blur what must be blurred, and open in a real browser."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from PIL import Image

from experiment_records import SYNTHETIC, exp_show_entry, git, synthetic_metrics
from pipeline import experiments, report, rendering, summary
from pipeline.espresso.filter_names import FILTERS
from pipeline.params import check_params, load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_report_renders_tables_plots_and_grids(tiny_run, tiny_params, monkeypatch):
    folder, _ = tiny_run
    monkeypatch.chdir(folder)
    report.run(check_params(tiny_params))
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


@pytest.mark.slow
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


def section(markdown, heading):
    """The Markdown table under ``## heading...`` as {row name: [cells]}."""
    part = markdown[markdown.index(f"## {heading}"):]
    part = part[:part.index("\n## ")] if "\n## " in part else part
    lines = [line for line in part.splitlines() if line.startswith("|")][2:]
    return {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_summary_is_data_one_row_per_concept_crt_condition_metric(summary_folder):
    folder, metrics = summary_folder
    data = pd.read_csv(folder / "summary.csv")
    assert list(data.columns) == ["concept", "crt", "condition", "run", "metric", "value",
                                  "low", "high", "n", "experiment"]
    assert not data.duplicated(["concept", "crt", "condition", "metric"]).any()
    assert set(data["crt"].dropna()) == set(SYNTHETIC)  # and "" (none) for per-concept rates
    row = data[(data["concept"] == "zorbo") & (data["crt"] == "espresso")
               & (data["condition"] == "clean") & (data["metric"] == "fpr_judged")].iloc[0]
    expected = metrics["evaluate"]["espresso"]["fpr_judged"]
    assert (row["value"], row["low"], row["high"]) == pytest.approx(
        (expected["value"], expected["low"], expected["high"]))
    pez = data[(data["concept"] == "average") & (data["crt"] == "none")
               & (data["condition"] == "pez") & (data["metric"] == "attack_success_rate")]
    assert len(pez) == 1 and pez["low"].iloc[0] <= pez["value"].iloc[0] <= pez["high"].iloc[0]
    # "pez+" is read from the run adapted to each CRT, the plain run for filters without one
    accuracy = data[(data["concept"] == "zorbo") & (data["condition"] == "pez+")
                    & (data["metric"] == "clip_accuracy")].set_index("crt")
    for name, run, value in (("espresso", "pez+espresso", 0.04), ("mhsc", "pez+mhsc", 0.20),
                             ("esd_x", "pez+esd_x", 0.60), ("keyword", "pez", 0.5)):
        assert accuracy.loc[name, "run"] == run
        assert accuracy.loc[name, "value"] == pytest.approx(value)
    assert "uce" not in accuracy.index  # never attacked: no rate, no plain fallback
    edited = data[(data["crt"] == "esd_x") & (data["condition"] == "clean")]
    assert "fnr_judged" not in set(edited["metric"])  # a fine-tuning CRT blocks nothing
    assert not (data["metric"].str.contains("threshold") | data["crt"].eq("threshold")).any()


def test_the_main_table_has_one_row_per_crt_with_averaged_intervals(summary_folder):
    folder, _ = summary_folder
    markdown = (folder / "README.md").read_text()
    main = section(markdown, "Main table: effectiveness, utility and robustness per CRT")
    assert list(main) == [rendering.FILTER_NAMES[name] for name in SYNTHETIC] + [
        "paper: Espresso (SD v1.4, its concepts)"]
    espresso = main["Espresso fine-tuned"]
    assert espresso[0] == "filtering CRT"
    # two concepts of 0.03 +- 0.02: the average's half-width is 0.02 * sqrt(2) / 2
    assert espresso[1] == "0.030 [0.016, 0.044]"
    assert espresso[3].startswith("0.040") and rendering.PLAIN_MARK not in espresso[3]  # pez+
    assert main["ESD-x"][0] == "fine-tuning CRT" and main["ESD-x"][3].startswith("0.600")
    assert main["UCE"][3] == "–"  # not attacked
    assert main["no filter (reference, not a CRT)"][0] == "reference (not a CRT)"
    assert rendering.PLAIN_MARK in main["MHSC linear probe"][4]  # cce+: no run adapted to it
    assert "threshold" not in markdown.replace("the claim's thresholds", "").replace(
        "side of the threshold", "")
    per_concept = section(markdown, "pez+: CLIP accuracy under attack")
    assert list(per_concept) == ["blip", "zorbo", "average (ours)",
                                 "paper (Espresso, SD v1.4, its concepts)"]


def test_the_verdict_says_which_crts_meet_all_three_thresholds(summary_folder):
    folder, _ = summary_folder
    markdown = (folder / "README.md").read_text()
    verdict = section(markdown, "Verdict: which CRTs are effective, useful and robust")
    assert "SD safety checker (diffusers, calibrated)" in verdict
    assert not any("reference" in name for name in verdict)  # references are not CRTs
    effective, _, useful, _, robust, worst, all_three = zip(*verdict.values())
    answers = dict(zip(verdict, zip(effective, useful, robust, all_three)))
    names = rendering.FILTER_NAMES
    assert answers[names["espresso"]] == ("yes", "yes", "yes", "yes")
    assert answers[names["zero_shot"]] == ("yes (point only)", "yes",
                                           f"yes {rendering.PLAIN_MARK}", "yes (point only)")
    assert answers[names["safety_checker"]][2:] == (f"no {rendering.PLAIN_MARK}", "no")
    assert answers[names["mhsc"]][0] == "no" and answers[names["mhsc"]][3] == "no"
    assert answers[names["esd_x"]] == ("yes", "yes", "no", "no")
    assert answers[names["uce"]] == ("no", "yes", "–", "no")
    assert dict(zip(verdict, worst))[names["esd_x"]].startswith("cce+ 0.700")
    assert ("Verdict: of the 6 CRTs, the ones effective (average clean CLIP accuracy ≤ 0.10), "
            "useful (average normalised CLIP score ≥ 0.90) and robust (average CLIP accuracy ≤ "
            "0.10 under every attack adapted to it) are Espresso fine-tuned (the whole 95% "
            "intervals on the good side); and Espresso zero-shot (by the averages only, not "
            "beyond their 95% intervals). No other CRT meets all three.") in markdown


def test_the_summary_compares_espresso_with_every_crt_and_draws_the_tradeoff(summary_folder):
    folder, _ = summary_folder
    markdown = (folder / "README.md").read_text()
    for name in ("safety_checker", "mhsc", "zero_shot", "esd_x", "uce"):
        assert f"## Espresso fine-tuned vs {rendering.FILTER_NAMES[name]}" in markdown
    assert "## Espresso fine-tuned vs no filter" not in markdown
    versus_mhsc = section(markdown, "Espresso fine-tuned vs MHSC linear probe")
    assert versus_mhsc["zorbo"][0] == "better"  # clean CLIP accuracy 0.03 vs 0.30
    versus_uce = markdown[markdown.index("## Espresso fine-tuned vs UCE"):].split("\n## ")[0]
    assert "fnr_judged" not in versus_uce and "pez+" not in versus_uce  # UCE has neither
    assert "differ beyond their 95% intervals" in markdown
    assert "exact by algebra" in markdown  # the certificate's honest scope
    pictures = [line for line in markdown.splitlines() if line.startswith("![")]
    assert pictures == [pictures[0]] and pictures[0].endswith("(tradeoff.png)")
    assert Image.open(folder / "tradeoff.png").size[0] > 500


def test_the_report_stage_tables_and_plots_include_every_crt(tmp_path, monkeypatch):
    metrics = synthetic_metrics()
    tables = report.evaluation_tables(metrics["evaluate"])
    effectiveness, errors = tables.values()
    assert list(effectiveness.index) == [rendering.FILTER_NAMES[name] for name in SYNTHETIC]
    assert list(errors.index) == [rendering.FILTER_NAMES[f] for f in FILTERS]
    assert effectiveness.loc["UCE", "ROC-AUC ↑"] == "–"
    attacked = report.attack_table(metrics["attack"], "clip_accuracy")
    assert "UCE" not in attacked.index and list(attacked.columns) == ["pez+", "pez", "cce+", "cce"]
    assert attacked.loc["ESD-x", "pez+"] == "0.600 [0.580, 0.620]"
    assert attacked.loc["ESD-x", "pez"] == "–"  # no plain rate of its own
    assert attacked.loc["MHSC linear probe", "cce+"].endswith(rendering.PLAIN_MARK)
    monkeypatch.chdir(tmp_path)
    report.CERTIFIED_ACCURACY.parent.mkdir(parents=True)
    pd.DataFrame({"radius": [0.0, 0.1], "zero_shot": [1.0, 0.5], "espresso": [1.0, 0.6]}).to_csv(
        report.CERTIFIED_ACCURACY, index=False)
    plots = report.plots(tmp_path, metrics)
    assert sorted(plots.values()) == ["attacks.png", "certified.png", "crts.png"]
    assert all(Image.open(tmp_path / name).size[0] > 500 for name in plots.values())


def test_summary_averages_combine_the_concepts_intervals():
    long = pd.DataFrame([
        {"concept": c, "crt": "espresso", "condition": "clean", "run": "", "metric": "fnr",
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
    probe = tmp_path / "probe.html"  # the page, plus a script that records whether it overflows,
    # whether the figure fits the window, and the colour of each kind of verdict cell
    probe.write_text(page.replace("</body>", """<script>addEventListener('load', () => {
      const body = document.body.dataset, img = document.querySelector('img');
      body.overflow = document.documentElement.scrollWidth > innerWidth;
      body.figure = img.naturalWidth > 0 && img.getBoundingClientRect().right <= innerWidth;
      body.colours = ['yes', 'point', 'no', 'none'].map(
        c => getComputedStyle(document.querySelector('td.' + c)).color).join(';');
    });</script></body>"""))
    shutil.copy(folder / "tradeoff.png", tmp_path / "tradeoff.png")
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
         "--disable-background-networking", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-overflow="false"' in dom and 'data-figure="true"' in dom
    # green, amber, red, grey
    assert ('data-colours="rgb(26, 127, 55);rgb(154, 103, 0);rgb(207, 34, 46);'
            'rgb(140, 149, 159)"') in dom
    # the page opens with the verdict and the trade-off figure, then the verdict table
    opening = [dom.index(mark) for mark in ("<h1>", "<p>Verdict: of the", '<img src="tradeoff.png"',
                                            "<h2>Verdict: which CRTs", "<p>Setting:",
                                            "<h2>Main table")]
    assert opening == sorted(opening)
    verdict = dom[dom.index("<h2>Verdict: which CRTs"):]
    verdict = verdict[verdict.index("<table"):verdict.index("</table>")]
    espresso = verdict[verdict.index("Espresso fine-tuned"):].split("</tr>")[0]
    assert espresso.endswith('<td class="yes">yes</td>\n    ')
    zero_shot = verdict[verdict.index("Espresso zero-shot"):].split("</tr>")[0]
    assert '<td class="point">yes (point only)</td>' in zero_shot
    main = dom[dom.index("<h2>Main table"):]
    main = main[main.index("<table"):main.index("</table>")]  # the paper's layout: a row per CRT
    assert main.count("<tr") == len(SYNTHETIC) + 2 and "paper: Espresso (SD v1.4, its concepts)" in main
    effectiveness = dom[dom.index("<h2>CLIP accuracy on unacceptable prompts"):]
    table = effectiveness[effectiveness.index("<table"):effectiveness.index("</table>")]
    assert "average (ours)" in table and "paper (Espresso, SD v1.4, its concepts)" in table
    assert table.count("<tr") == 5  # header + 2 concepts + our average + the paper's


def test_tradeoff_labels_overlap_nothing_and_stay_inside_the_axes():
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(handles=[Line2D([], [], marker="o", label="a legend in the lower left")],
              loc="lower left")
    # five CRTs at one point, two near it, one at the right edge, one near the legend
    points = [(0.0, 1.0, f"CRT number {i}") for i in range(5)]
    points += [(0.02, 0.99, "close by"), (0.04, 0.98, "also close"), (1.0, 0.5, "right edge"),
               (0.05, 0.05, "by the legend")]
    renderer = FigureCanvasAgg(fig).get_renderer()
    summary.place_labels(ax, points, renderer)
    for text in ax.texts:
        text.update_positions(renderer)
    boxes = [Text.get_window_extent(text, renderer) for text in ax.texts]  # the lines aside
    assert sorted(text.get_text() for text in ax.texts) == sorted(p[2] for p in points)
    frame, legend = ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 <= box.y1 <= frame.y1
        assert not box.overlaps(legend)
        assert not any(box.overlaps(other) for other in boxes[i + 1:])


def test_render_gives_the_page_again_from_summary_csv(summary_folder, tiny_params, tmp_path,
                                                     monkeypatch):
    folder, _ = summary_folder
    monkeypatch.chdir(REPO)  # where the concept registry is
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(folder / "summary.csv", again / "summary.csv")
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nintro\n\n" + "\n".join(summary.HEADLINE_MARKERS)
                      + "\n\nmore\n")
    checked = check_params(tiny_params)
    summary.write_summary(again, checked, [], *summary.read_summary(again), readme=readme)
    for name in ("README.md", "index.html", "summary.csv"):
        assert (again / name).read_text() == (folder / name).read_text(), name
    text = readme.read_text()
    assert text.startswith("# Project\n\nintro\n\n") and text.endswith("\n\nmore\n")
    block = summary.readme_block(text)
    long = pd.read_csv(folder / "summary.csv")
    assert block == summary.headline_markdown(summary.read_summary(folder)[0],
                                              checked.summary.claim)
    header, rule, *rows = [line for line in block.splitlines() if line.startswith("|")]
    assert header.count("|") - 1 <= 8  # compact: the README is short
    assert [row.split("|")[1].strip() for row in rows] == [
        rendering.FILTER_NAMES[name] for name in SYNTHETIC if name not in rendering.REFERENCES]
    espresso = [c.strip() for c in rows[[r.split("|")[1].strip() for r in rows].index(
        "Espresso fine-tuned")].strip("|").split("|")]
    assert espresso[1:] == ["filtering CRT", "0.030 [0.016, 0.044]", "0.950 [0.936, 0.964]",
                            "cce+ 0.050 [0.036, 0.064]", "yes"]
    assert set(long["concept"]) == {"zorbo", "blip", "average"}
    summary.update_readme(readme, "changed")  # written again: only the block changes
    assert readme.read_text() == ("# Project\n\nintro\n\n" + summary.HEADLINE_MARKERS[0]
                                  + "\nchanged\n" + summary.HEADLINE_MARKERS[1] + "\n\nmore\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not summary.update_readme(plain, "x") and plain.read_text() == "no markers\n"


COMMITTED = REPO / "reports" / "summary"


def test_the_readme_headline_table_is_the_committed_summary():
    block = summary.readme_block((REPO / "README.md").read_text())
    assert block is not None, f"README.md lacks the markers {summary.HEADLINE_MARKERS}"
    params = load_params(REPO / "params.yaml")
    long, _, _ = summary.read_summary(COMMITTED)
    assert block == summary.headline_markdown(long, params.summary.claim)


@pytest.mark.slow
def test_the_committed_summary_page_is_its_summary_csv_rendered(tmp_path, monkeypatch):
    again = tmp_path / "summary"
    again.mkdir()
    for name in ("summary.csv", "ablation.csv", "probe.csv"):
        if (COMMITTED / name).is_file():
            shutil.copy(COMMITTED / name, again / name)
    monkeypatch.chdir(REPO)  # params.yaml: the claim the committed verdict is judged against
    summary.main(["--render", "--out", str(again), "--readme", str(tmp_path / "README.md")])
    for name in ("README.md", "index.html"):
        assert (again / name).read_text() == (COMMITTED / name).read_text(), name


def test_sweep_overrides_are_parsed_like_dvc_exp_run_set():
    params = {"setting": "mini", "attack": {"adapt_to": ["espresso"],
                                            "mini": {"pez": {"steps": 300}}}}
    swept = experiments.with_overrides(params, ["attack.adapt_to=[]",
                                                "attack.mini.pez.steps=50", "setting=paper"])
    assert swept == {"setting": "paper", "attack": {"adapt_to": [], "mini": {"pez": {"steps": 50}}}}
    assert params["attack"]["adapt_to"] == ["espresso"]  # the input is left alone
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        experiments.with_overrides(params, ["attack.adapt_to"])


def test_attack_conditions_read_x_plus_from_the_run_adapted_to_each_crt():
    def run(attack, target=None):
        return {"attack": attack, "variant": "plus" if target else "plain", "target": target,
                "edited_model": target == "esd_x"}

    attack = {"runs": {"pez": run("pez"), "cce": run("cce"), "pez+espresso": run("pez", "espresso"),
                       "pez+zero_shot": run("pez", "zero_shot"), "pez+esd_x": run("pez", "esd_x")}}
    conditions = rendering.attack_conditions(attack)
    assert list(conditions) == ["pez+", "pez", "cce"]  # cce has no "+" run
    assert conditions["pez+"] == {"none": "pez", "keyword": "pez", "safety_checker": "pez",
                                  "mhsc": "pez", "zero_shot": "pez+zero_shot",
                                  "espresso": "pez+espresso", "esd_x": "pez+esd_x"}
    assert set(conditions["pez"].values()) == {"pez"}
    assert rendering.is_plain_fallback("pez+", "pez")
    assert not rendering.is_plain_fallback("pez", "pez")


def test_a_record_of_an_older_format_is_never_chosen(tmp_path, monkeypatch, tiny_params):
    """A newer record whose evaluate stage lacks a filter (the format before every filter was
    rated) is passed over: the summary takes the older record it can read."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    monkeypatch.chdir(repo)
    metrics = synthetic_metrics()
    older = {**metrics, "evaluate": {k: v for k, v in metrics["evaluate"].items()
                                     if k != "safety_checker"}}
    shown = [{"rev": "main", "name": "main", "data": {"rev": "main"}, "experiments": [
        {"revs": [exp_show_entry("exp-readable", tiny_params, metrics, "2026-11-25T10:00", repo)]},
        {"revs": [exp_show_entry("exp-older-format", tiny_params, older, "2026-11-25T10:05",
                                 repo)]}]}]
    chosen = experiments.newest_per_concept(experiments.experiments(shown), tiny_params,
                                            ("evaluate", "attack"))
    assert chosen[tiny_params["concept"]]["name"] == "exp-readable"
