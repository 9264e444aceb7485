"""What the report stage and the cross-concept summary render alike: the CRTs' display names and
kinds, rate cells, the attack conditions a rate is read from, the notes every report carries,
and Markdown + HTML pages. Not a stage: the summary renders without importing the report stage."""
from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING

from pipeline.espresso.filter_names import FILTERS

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.schema import Params

#: Display names of the filters and fine-tuning CRTs, in the order of every table's rows.
FILTER_NAMES = {"none": "no filter (reference, not a CRT)",
                "keyword": "keyword blocklist (reference, not a CRT)",
                "safety_checker": "SD safety checker (diffusers, calibrated)",
                "mhsc": "MHSC linear probe", "zero_shot": "Espresso zero-shot",
                "espresso": "Espresso fine-tuned",
                "esd_x": "ESD-x", "esd_u": "ESD-u", "uce": "UCE", "ca": "CA"}
#: What the CRTs are measured against: neither removes the concept from what CLIP sees.
REFERENCES = ("none", "keyword")


def kind_of(name: str) -> str:
    """A row's kind: references are kept apart so that no verdict counts them as CRTs."""
    if name in REFERENCES:
        return "reference (not a CRT)"
    return "filtering CRT" if name in FILTERS else "fine-tuning CRT"


def crts_of(evaluate: dict) -> list[str]:
    """The filters, then the fine-tuning CRTs the evaluate stage scored (a CRT has a rate
    dict there with a normalised CLIP score), in FILTER_NAMES order."""
    return [*FILTERS, *(name for name in FILTER_NAMES if name not in FILTERS
                        and "normalized_clip_score" in (evaluate.get(name) or {}))]


def cell(rate) -> str:
    """A rate (a detail.json dict with value, low, high) as '0.031 [0.010, 0.090]' (value
    [95% interval]); a bare number as '0.031'; '–' where there is no value."""
    import pandas as pd

    if not isinstance(rate, dict):
        rate = {"value": rate}
    value, low, high = (rate.get(k) for k in ("value", "low", "high"))
    if value is None or pd.isna(value):
        return "–"
    if low is None or pd.isna(low):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


PLAIN_NOTE = ("Attacks: \"X\" is the plain attack (no filter term) on the unedited model, the "
              "same images for every filter; \"X+\" is the run adapted to the CRT in that row "
              "or column: for a filter, X with that filter's terms (attack.adapt_to; only filters "
              "with a margin on CLIP embeddings can be adapted to: SD safety checker, MHSC probe, "
              "zero-shot and fine-tuned Espresso); for a fine-tuning CRT, X run through its edited "
              "model (it has no plain rate of its own). worst+: the worst adapted attack, draw "
              "by draw of the bootstrap.")


#: METHOD section 7's honest scope, stated wherever certificates are reported.
CERTIFICATE_SCOPE = (
    "Scope of the certificate: Espresso's decision is linear in CLIP's image embedding, so the "
    "certified radius |<z, w>|/|w| is exact by algebra and its verification only checks the "
    "arithmetic; it cannot reveal a weakness. Attacks perturb the prompt, and so the pixels: the "
    "share of attack images that moved farther in embedding space than the radius of the "
    "nearest clean image is the informative part.")


#: What a report of a run with a budget other than full says at its top (``params.yaml``
#: ``budget``; the smoke preset runs every stage in minutes on cuts that make its rates noise).
NOT_RESULTS = "{budget} budgets: not results"
NOT_RESULTS_WHY = ("This run used budget: {budget} (params.yaml presets.{budget}): a few steps, "
                   "prompts and images per stage, to check that every stage runs. Its numbers "
                   "mean nothing; results need budget: full.")
#: The banner stands out and stays in view while the page scrolls.
BANNER_STYLE = ("position:sticky;top:0;z-index:1;background:#b00020;color:#fff;"
                "padding:.8em 1em;margin:0 0 1em;border:4px solid #000;font-size:125%")


def budget_of(params: Params | None, metrics: dict | None = None) -> str:
    """The budget of what a report shows: a budget other than full in the params or in any
    stage's results (``pipeline.params.mark_budget``) wins; else full."""
    marked = [m.get("budget") for m in (metrics or {}).values() if isinstance(m, dict)]
    given = params.budget if params is not None else "full"
    return next((b for b in [given, *marked] if b and b != "full"), "full")


def render(title: str, intro: list[str], tables: dict[str, pd.DataFrame],
           figures: dict[str, str], first: list[str] = (), budget: str = "full") -> tuple[str, str]:
    """The same content as Markdown and as a standalone HTML page: the title, then ``first``
    (what a reader sees first, in order: captions of ``tables`` or ``figures``, or paragraphs of
    text), the intro, the other tables and the other figures. On the page, verdict cells are
    coloured: 'yes' green, 'yes (point only)' amber, 'no' red, '–' (not measured) grey. Under a
    budget other than full, both open with the ``NOT_RESULTS`` banner."""
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    if budget != "full":
        headline = NOT_RESULTS.format(budget=budget).upper()
        why = NOT_RESULTS_WHY.format(budget=budget)
        md = [f"> **⚠ {headline}.** {why}", ""] + md
        body.insert(0, f'<div class="not-results" role="alert" style="{BANNER_STYLE}"><strong '
                       f'style="font-size:140%;letter-spacing:.05em">⚠ {html.escape(headline)}'
                       f'</strong><br>{html.escape(why)}</div>')

    def paragraph(text: str) -> None:
        md.extend([text, ""])
        body.append(f"<p>{html.escape(text)}</p>")

    def table(caption: str) -> None:
        md.extend([f"## {caption}", "", tables[caption].to_markdown(floatfmt=".3f"), ""])
        page = tables[caption].to_html(float_format="{:.3f}".format, na_rep="–",
                                       classes="metrics")
        body.extend([f"<h2>{html.escape(caption)}</h2>",
                     f'<div class="scroll">{VERDICT_CELL.sub(_coloured, page)}</div>'])

    def figure(caption: str) -> None:
        md.extend([f"### {caption}", "", f"![{caption}]({figures[caption]})", ""])
        body.extend([f"<h3>{html.escape(caption)}</h3>",
                     f'<img src="{figures[caption]}" alt="{html.escape(caption)}">'])

    for item in first:
        (table if item in tables else figure if item in figures else paragraph)(item)
    for text in intro:
        paragraph(text)
    for caption in tables:
        if caption not in first:
            table(caption)
    for caption in figures:
        if caption not in first:
            figure(caption)
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
            ".scroll{overflow-x:auto}"
            "table.metrics{border-collapse:collapse;font-size:85%}"
            "table.metrics td,table.metrics th{padding:.25em .6em;border-bottom:1px solid #ddd;"
            "text-align:right}img{max-width:100%;image-rendering:pixelated}"
            "td.yes{color:#1a7f37;font-weight:bold}td.point{color:#9a6700;font-weight:bold}"
            "td.no{color:#cf222e;font-weight:bold}td.none{color:#8c959f}"
            "</style></head><body>" + "\n".join(body) + "</body></html>\n")
    return "\n".join(md), page


#: A table cell (as pandas writes it) holding only a verdict, maybe marked PLAIN_MARK.
VERDICT_CELL = re.compile(r"<td>(yes|yes \(point only\)|no|–)((?: \S)?)</td>")
VERDICT_CLASS = {"yes": "yes", "yes (point only)": "point", "no": "no", "–": "none"}


def _coloured(match: re.Match) -> str:
    return f'<td class="{VERDICT_CLASS[match[1]]}">{match[1]}{match[2]}</td>'
