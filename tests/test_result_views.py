"""What a notebook user sees of a screening: the readable repr of ``Screening`` and
``CheckResult`` (one line per image, a count past ``REPR_ROWS``), and their records /
DataFrame forms, on results with known answers (no model needed)."""
import sys

import numpy as np
import pytest

from pipeline.espresso import CheckResult, Screening
from pipeline.espresso.filter import REPR_ROWS

NAN = float("nan")


def screening(n: int = 3) -> Screening:
    p = np.array([0.9, 0.2, NAN] + [0.1] * (n - 3))
    errors = [None, None, "image 2 is uint16: give uint8"] + [None] * (n - 3)
    return Screening(list(range(n)), ~(p <= 0.5), p, errors, "Zorbo")


def check_result(n: int = 3) -> CheckResult:
    p = np.array([[0.9, 0.6], [0.2, 0.4], [NAN, NAN]] + [[0.1, 0.3]] * (n - 3))
    fired = ~(p <= 0.5)
    return CheckResult(list(range(n)), fired.any(1), p, fired, ["zorbo", "mimi"],
                       [None, None, "model failed: RuntimeError"] + [None] * (n - 3))


def test_screening_repr_is_one_line_per_image():
    assert repr(screening()) == (
        "Screening(3 images for 'Zorbo': 2 blocked, 1 passed)\n"
        "  [0] blocked  P(unacceptable) 0.900\n"
        "  [1] passed   P(unacceptable) 0.200\n"
        "  [2] blocked  unscored: image 2 is uint16: give uint8")


def test_check_result_repr_names_the_concepts_that_fired():
    assert repr(check_result()) == (
        "CheckResult(3 images x 2 concepts: 2 blocked, 1 passed)\n"
        "  [0] blocked  zorbo 0.900, mimi 0.600\n"
        "  [1] passed   highest mimi 0.400\n"
        "  [2] blocked  unscored: model failed: RuntimeError")


@pytest.mark.parametrize("make", [screening, check_result])
def test_a_large_batch_repr_is_truncated_with_a_count(make):
    lines = repr(make(1000)).splitlines()
    assert len(lines) == REPR_ROWS + 2
    assert lines[0].startswith(f"{type(make(3)).__name__}(1000 images")
    assert "2 blocked, 998 passed" in lines[0]
    assert lines[-1] == f"  ... {1000 - REPR_ROWS} more images (0 blocked)"


def test_screening_records_and_frame():
    records = screening().to_records()
    assert records == [
        {"image": 0, "concept": "Zorbo", "blocked": True, "p_unacceptable": 0.9,
         "p_vs_everyday": None, "error": None},
        {"image": 1, "concept": "Zorbo", "blocked": False, "p_unacceptable": 0.2,
         "p_vs_everyday": None, "error": None},
        {"image": 2, "concept": "Zorbo", "blocked": True, "p_unacceptable": None,
         "p_vs_everyday": None, "error": "image 2 is uint16: give uint8"}]
    assert all(type(r["blocked"]) is bool for r in records)
    frame = screening().to_pandas()
    assert list(frame.columns) == list(Screening.COLUMNS)
    assert frame["blocked"].tolist() == [True, False, True]
    assert frame["p_unacceptable"].iloc[:2].tolist() == [0.9, 0.2]
    assert np.isnan(frame["p_unacceptable"].iloc[2])


def test_check_result_records_are_one_per_image_and_concept():
    records = check_result().to_records()
    assert len(records) == 6
    assert records[1] == {"image": 0, "concept": "mimi", "p_unacceptable": 0.6,
                          "p_vs_everyday": None, "fired": True, "blocked": True, "error": None}
    assert records[3] == {"image": 1, "concept": "mimi", "p_unacceptable": 0.4,
                          "p_vs_everyday": None, "fired": False, "blocked": False, "error": None}
    assert records[4]["p_unacceptable"] is None and records[4]["fired"] is True
    frame = check_result().to_pandas()
    assert list(frame.columns) == list(CheckResult.COLUMNS)
    assert frame.groupby("image")["blocked"].first().tolist() == [True, False, True]
    assert frame.loc[frame.fired & ~frame.p_unacceptable.isna(), "concept"].tolist() == [
        "zorbo", "mimi"]


def test_to_pandas_without_pandas_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    for result in (screening(), check_result()):
        with pytest.raises(ImportError, match=r"pip install pandas") as err:
            result.to_pandas()
        assert "\n" not in str(err.value)
        assert result.to_records()  # the records need no pandas
