"""The paper's figures (data/paper_figures.yaml, pipeline.paper_figures): the shipped file loads,
every entry has a source, a cell shows only what the file states for exactly that cell, and a
bad entry is refused with one line naming it and the fix."""
import math
from pathlib import Path

import pytest
import yaml

from pipeline import paper_figures
from pipeline.paper_figures import PaperFiguresError, cells, load

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "data" / "paper_figures.yaml"
GOOD = {"version": "arXiv v2", "crt": "espresso", "condition": "clean",
        "metric": "clip_accuracy", "value": 0.05, "over": "its concepts",
        "source": "arXiv 2404.19227v2, abstract"}


def write(tmp_path: Path, entries: list) -> Path:
    path = tmp_path / "figures.yaml"
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def shipped():
    return load(SHIPPED)


def test_the_shipped_file_loads_with_the_columns(shipped):
    assert list(shipped.columns[:9]) == ["version", "crt", "condition", "metric", "value", "low",
                                         "high", "over", "source"]
    assert len(shipped) > 0
    for row in shipped.itertuples():
        single, ranged = not math.isnan(row.value), not math.isnan(row.low)
        assert single != ranged, row  # a value or a range, never both, never neither
        assert ranged == (not math.isnan(row.high)), row


def test_every_shipped_entry_has_a_source_that_names_its_version(shipped):
    for row in shipped.itertuples():
        assert row.source.strip() and row.over.strip(), row
        assert paper_figures.short(row.version) in row.source, row


def test_no_cell_gets_a_figure_the_file_does_not_state(shipped):
    stated = {(row.condition, row.metric) for row in shipped.itertuples()
              if row.crt == "espresso"}
    for condition in (*paper_figures.CONDITIONS, *paper_figures.UNREPORTED):
        for metric in paper_figures.METRICS:
            texts = cells(shipped, condition, metric)
            assert bool(texts) == ((condition, metric) in stated), (condition, metric)
            assert len(texts) == len(shipped[(shipped.condition == condition)
                                             & (shipped.metric == metric)
                                             & (shipped.crt == "espresso")])


def test_a_pooled_attacks_figure_is_in_no_single_attacks_cell(tmp_path):
    frame = load(write(tmp_path, [dict(GOOD, condition="attacks", value=0.04,
                                       approximate=True)]))
    assert cells(frame, "attacks", "clip_accuracy") == ["~0.04 (v2, pooled over attacks)"]
    for attack in ("typo+", "pez+", "cce+", "ringbell+", "typo"):
        assert cells(frame, attack, "clip_accuracy") == []
    assert cells(frame, "clean", "clip_accuracy") == []
    assert cells(frame, "attacks", "normalized_clip_score") == []
    assert cells(frame, "attacks", "clip_accuracy", crt="uce") == []


def test_a_cell_renders_a_range_and_a_single_figure_with_their_versions(tmp_path):
    frame = load(write(tmp_path, [
        dict(GOOD, approximate=True),
        {**{k: v for k, v in GOOD.items() if k != "value"}, "version": "arXiv v4 / CODASPY 2025",
         "range": [0.01, 0.06], "source": "arXiv 2404.19227v4, abstract"},
        dict(GOOD, condition="pez+", value=0.1, version="arXiv v6",
             source="arXiv 2404.19227v6, Table 9")]))
    assert cells(frame, "clean", "clip_accuracy") == ["~0.05 (v2)", "0.01–0.06 (v4)"]
    assert cells(frame, "pez+", "clip_accuracy") == ["0.10 (v6)"]
    row = frame.iloc[1]
    assert math.isnan(row.value) and (row.low, row.high) == (0.01, 0.06)
    assert math.isnan(frame.iloc[0].low) and math.isnan(frame.iloc[0].high)


def test_an_unknown_name_asked_of_cells_is_an_error_not_an_empty_cell(shipped):
    with pytest.raises(ValueError, match="clip_acc"):
        cells(shipped, "clean", "clip_acc")
    with pytest.raises(ValueError, match="typo\\+\\+"):
        cells(shipped, "typo++", "clip_accuracy")


def without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


@pytest.mark.parametrize("entry, says", [
    (dict(GOOD, colour="red"), "colour: unknown key; remove it"),
    (dict(GOOD, metric="fnr"), "metric: 'fnr' is not allowed; use one of"),
    (dict(GOOD, condition="typo"), "condition: 'typo' is not allowed; use one of"),
    (dict(GOOD, crt="sdd"), "crt: 'sdd' is not allowed; use one of"),
    (dict(without("value"), range=[0.4, 0.2]), "low 0.4 > high 0.2; write it as [low, high]"),
    (dict(without("value"), range=[0.1]), "write it as [low, high]"),
    (dict(GOOD, value=5), "5.0 is not a fraction in [0, 1]"),
    (dict(GOOD, value=-0.1), "is not a fraction in [0, 1]"),
    (dict(without("value"), range=[0.1, 40]), "40.0 is not a fraction in [0, 1]"),
    (dict(GOOD, range=[0.0, 0.1]), "give exactly one of value"),
    (without("value"), "give exactly one of value"),
    (without("source"), "source: missing; add it"),
    (dict(GOOD, source=" "), "source: is empty"),
    (dict(GOOD, value="0.05"), "value: Input should be a valid number"),
])
def test_a_bad_entry_is_one_line_naming_the_entry_and_the_fix(tmp_path, entry, says):
    path = write(tmp_path, [GOOD | {"condition": "attacks"}, entry])
    with pytest.raises(PaperFiguresError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: entry 2 ("), message
    assert says in message, message


def test_the_same_figure_twice_and_a_file_that_is_not_a_list_are_refused(tmp_path):
    with pytest.raises(PaperFiguresError, match="entry 2 .*the same figure as entry 1"):
        load(write(tmp_path, [GOOD, GOOD]))
    path = tmp_path / "mapping.yaml"
    path.write_text("figures: []\n")
    with pytest.raises(PaperFiguresError, match="a list of entries is expected"):
        load(path)


def test_every_bad_entry_gets_its_own_line(tmp_path):
    path = write(tmp_path, [dict(GOOD, metric="x"), GOOD, dict(GOOD, condition="y")])
    with pytest.raises(PaperFiguresError) as caught:
        load(path)
    lines = str(caught.value).splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"{path}: entry 1", f"{path}: entry 3"]


def test_importing_it_loads_no_heavy_library():
    import os
    import subprocess
    import sys
    code = ("import sys, pipeline.paper_figures; "
            "print(sorted(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules))")
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": pythonpath}, check=True)
    assert out.stdout.strip() == "[]"
