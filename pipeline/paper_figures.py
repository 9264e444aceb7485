"""The Espresso paper's own figures, per version of the paper, as ``data/paper_figures.yaml``
states them: :func:`load` reads and checks the file into a table, :func:`cells` gives the texts
of one table cell (a condition and a metric), ``[]`` where the paper reports nothing for it.

Decision: the paper's figures live in a data file with a source on every entry, not in a dict in
``pipeline.summary``. The paper's versions differ (arXiv v2's abstract gives rounded single
figures, "~5%"; v4's gives ranges, "[0.00, 0.20]"), and a figure the paper pools over all its
attacks is not a figure for any one attack: an entry's ``condition`` is where the paper puts it,
and :func:`cells` matches it exactly, so a pooled ``attacks`` figure never appears in the
``typo+`` cell.

Cheap to import: pydantic and yaml at the top, pandas inside :func:`load`; no torch.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pipeline import registry

if TYPE_CHECKING:
    import pandas as pd

PATH = Path("data/paper_figures.yaml")
#: The CRTs an entry may name: the filters an attack can adapt to, and the fine-tuning CRTs.
CRTS = (*registry.ADAPTABLE, *registry.CRTS)
#: ``clean``, one adaptive attack (``X+``), or ``attacks``: a figure the paper pools over all
#: its attacks.
CONDITIONS = ("clean", *(f"{name}+" for name in registry.ATTACKS), "attacks")
#: Conditions :func:`cells` is asked about that the file cannot hold (the plain, non-adapted
#: attacks of our summary): always ``[]``.
UNREPORTED = registry.ATTACKS
METRICS = ("clip_accuracy", "normalized_clip_score")
COLUMNS = ("version", "crt", "condition", "metric", "value", "low", "high", "over", "source",
           "approximate", "quote")
FIXES = {
    "extra_forbidden": "remove it (keys: {keys})",
    "bool_type": "write true or false",
    "string_type": "write it as text",
    "float_type": "write a number",
    "list_type": "write it as [low, high]",
}


class PaperFiguresError(ValueError):
    """An entry of the paper's figures that is not allowed; one line per bad entry, naming the
    entry (its position and what it says) and the fix."""


def fraction(number: float) -> float:
    if isinstance(number, bool) or not math.isfinite(number) or not 0 <= number <= 1:
        raise ValueError(f"{number} is not a fraction in [0, 1]; write rates as fractions "
                         f"(0.05, not 5%)")
    return number


class Entry(BaseModel):
    """One figure the paper states: a ``value`` or a ``range`` (exactly one)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: str
    crt: Literal[CRTS]  # type: ignore[valid-type]
    condition: Literal[CONDITIONS]  # type: ignore[valid-type]
    metric: Literal[METRICS]  # type: ignore[valid-type]
    value: Optional[float] = None
    range: Optional[list[float]] = None
    approximate: bool = False
    over: str
    source: str
    quote: Optional[str] = None

    @field_validator("version", "over", "source")
    @classmethod
    def not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("is empty; say it")
        return text

    @field_validator("value")
    @classmethod
    def value_is_a_fraction(cls, value: Optional[float]) -> Optional[float]:
        return None if value is None else fraction(value)

    @field_validator("range")
    @classmethod
    def range_is_ordered_fractions(cls, pair: Optional[list[float]]) -> Optional[list[float]]:
        if pair is None:
            return None
        if len(pair) != 2:
            raise ValueError(f"{pair} has {len(pair)} numbers; write it as [low, high]")
        low, high = fraction(pair[0]), fraction(pair[1])
        if low > high:
            raise ValueError(f"low {low} > high {high}; write it as [low, high]")
        return pair

    @model_validator(mode="after")
    def one_figure(self) -> "Entry":
        if (self.value is None) == (self.range is None):
            raise ValueError("give exactly one of value (a single figure) and range "
                             "([low, high], where the paper gives a range)")
        return self

    def label(self) -> str:
        return f"{self.version}, {self.crt}, {self.condition}, {self.metric}"


def problem(error: dict) -> str:
    """One pydantic error as ``key: what is wrong; fix``."""
    where = ".".join(str(part) for part in error["loc"]) or "entry"
    kind = error["type"]
    if kind == "literal_error":
        return f"{where}: {error['input']!r} is not allowed; use one of {error['ctx']['expected']}"
    if kind == "extra_forbidden":
        keys = ", ".join(Entry.model_fields)
        return f"{where}: unknown key; " + FIXES[kind].format(keys=keys)
    if kind == "value_error":
        return f"{where}: {error['ctx']['error']}"
    if kind == "missing":
        return f"{where}: missing; add it"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where}: {error.get('input')!r} is not an entry; write key: value lines"
    fix = FIXES.get(kind, "see the header of the file")
    return f"{where}: {error['msg']} (got {error.get('input')!r}); {fix}"


def entries(raw: object, path: Path) -> list[Entry]:
    """The checked entries of the file's contents; a :class:`PaperFiguresError` with one line
    per bad entry."""
    if not isinstance(raw, list):
        raise PaperFiguresError(f"{path}: a list of entries is expected, got "
                                f"{type(raw).__name__}; see the header of the file")
    out, lines, seen = [], [], {}
    for number, item in enumerate(raw, 1):
        name = f"{path}: entry {number}"
        if isinstance(item, dict):
            name += " (" + ", ".join(str(item.get(key, "?")) for key in
                                     ("version", "crt", "condition", "metric")) + ")"
        try:
            entry = Entry.model_validate(item)
        except ValidationError as error:
            lines.append(f"{name}: " + "; ".join(problem(e) for e in error.errors()))
            continue
        key = entry.label()
        if key in seen:
            lines.append(f"{name}: the same figure as entry {seen[key]}; keep one")
            continue
        seen[key] = number
        out.append(entry)
    if lines:
        raise PaperFiguresError("\n".join(lines))
    return out


def load(path: Path = PATH) -> "pd.DataFrame":
    """The paper's figures, one row per entry (columns :data:`COLUMNS`): ``value`` NaN where the
    paper gives a range, ``low``/``high`` NaN where it gives a single figure."""
    import pandas as pd

    path = Path(path)
    rows = []
    for entry in entries(yaml.safe_load(path.read_text()), path):
        low, high = entry.range if entry.range is not None else (math.nan, math.nan)
        rows.append({"version": entry.version, "crt": entry.crt, "condition": entry.condition,
                     "metric": entry.metric,
                     "value": math.nan if entry.value is None else entry.value,
                     "low": low, "high": high, "over": entry.over, "source": entry.source,
                     "approximate": entry.approximate, "quote": entry.quote})
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype({"value": float, "low": float, "high": float, "approximate": bool})


def short(version: str) -> str:
    """``"arXiv v4 / CODASPY 2025"`` -> ``"v4"``; a version without a ``vN`` is kept whole."""
    found = re.search(r"\bv\d+\b", version)
    return found.group(0) if found else version


def cells(frame: "pd.DataFrame", condition: str, metric: str,
          crt: str = "espresso") -> list[str]:
    """The texts of the paper's figures for one table cell, in the file's order: ``"~0.04 (v2,
    pooled over attacks)"``, ``"0.00–0.20 (v4)"``; ``[]`` where the paper reports nothing for
    it. Only entries of exactly this condition: a figure pooled over attacks is the
    ``attacks`` cell's, not any one attack's. An unknown condition, metric or CRT name is a
    ``ValueError`` (a typo would otherwise read as "not reported")."""
    for name, allowed in ((condition, (*CONDITIONS, *UNREPORTED)), (metric, METRICS),
                          (crt, CRTS)):
        if name not in allowed:
            raise ValueError(f"unknown name {name!r}; known: {', '.join(allowed)}")
    rows = frame[(frame["condition"] == condition) & (frame["metric"] == metric)
                 & (frame["crt"] == crt)]
    out = []
    for row in rows.itertuples(index=False):
        if math.isnan(row.value):
            figure = f"{row.low:.2f}–{row.high:.2f}"
        else:
            figure = ("~" if row.approximate else "") + f"{row.value:.2f}"
        notes = [short(row.version)] + (["pooled over attacks"] if condition == "attacks" else [])
        out.append(f"{figure} ({', '.join(notes)})")
    return out
