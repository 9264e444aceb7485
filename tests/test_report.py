"""Reports render from a tiny real run, blur what must be blurred, and open in a real browser."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from PIL import Image

from experiment_records import EDITS, score_tables
from pipeline import evaluate, experiments, outcomes, report, rendering, summary
from pipeline.espresso.filter_names import FILTERS
from pipeline.params import check_params

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_report_renders_tables_plots_and_grids(tiny_run, tiny_params, monkeypatch):
    folder, _ = tiny_run
    monkeypatch.chdir(folder)
    report.run(check_params(tiny_params))
    out = folder / report.OUT
    markdown = (out / "README.md").read_text()
    for heading in ("Effectiveness and utility", "Error rates", "Everyday prompts",
                    "Attack success", "CLIP accuracy under attack", "Certified robustness"):
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


def test_the_report_stage_tables_and_plots_include_every_crt(tmp_path, monkeypatch, tiny_params):
    """From known score tables (experiment_records.PROFILE): a row per CRT, the judge's leak
    first, attack rates clustered by the attack's prompts, and the three plots."""
    stats = check_params(tiny_params).statistics
    scores = score_tables(0)
    rates = outcomes.clean(scores["evaluate"], stats)
    detail = {crt: evaluate.rated(rates, crt, stats) for crt in (*FILTERS, *EDITS)}
    effectiveness, errors = report.evaluation_tables(detail).values()
    assert list(effectiveness.index) == [rendering.FILTER_NAMES[n] for n in (*FILTERS, *EDITS)]
    assert effectiveness.columns[0].startswith("leak")
    assert effectiveness.loc["Espresso fine-tuned"].iloc[0] == "0.000 [0.000, 0.369]"  # 0 of 8
    attacked = outcomes.attacked(scores["attack"], stats)
    table = report.attack_table(attacked, "attack_success", stats.confidence)
    assert list(table.columns) == ["cce+", "pez+", "udiff+", "worst+", "cce", "pez"]
    assert table.loc["ESD-x", "pez"] != "–"  # the plain prompts, rendered by the edit
    assert table.loc["ESD-x", "udiff+"] != "–" and table.loc["Espresso fine-tuned", "udiff+"] == "–"
    assert table.loc["SD safety checker (diffusers, calibrated)", "pez+"] == "–"  # not adapted to
    assert table.loc["Espresso fine-tuned", "worst+"] == "0.000 [0.000, 0.369]"
    monkeypatch.chdir(tmp_path)
    report.CERTIFIED_ACCURACY.parent.mkdir(parents=True)
    pd.DataFrame({"radius": [0.0, 0.1], "zero_shot": [1.0, 0.5], "espresso": [1.0, 0.6]}).to_csv(
        report.CERTIFIED_ACCURACY, index=False)
    plots = report.plots(tmp_path, {"evaluate": detail}, attacked, stats.confidence)
    assert sorted(plots.values()) == ["attacks.png", "certified.png", "crts.png"]
    assert all(Image.open(tmp_path / name).size[0] > 500 for name in plots.values())


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


def test_sweep_overrides_are_parsed_like_dvc_exp_run_set():
    params = {"setting": "mini", "attack": {"adapt_to": ["espresso"],
                                            "mini": {"pez": {"steps": 300}}}}
    swept = experiments.with_overrides(params, ["attack.adapt_to=[]",
                                                "attack.mini.pez.steps=50", "setting=paper"])
    assert swept == {"setting": "paper", "attack": {"adapt_to": [], "mini": {"pez": {"steps": 50}}}}
    assert params["attack"]["adapt_to"] == ["espresso"]  # the input is left alone
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        experiments.with_overrides(params, ["attack.adapt_to"])
