"""The README is a short entrance and the documentation's links hold: README.md is at most 300
lines, starts with the two commands for a fresh machine, has a table of contents whose anchors
are its headings, and holds the summary's headline markers; every relative link in README.md and
docs/*.md names a file that exists, and a heading there where it gives an anchor. Offline, fast:
it reads Markdown files only."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
COMMANDS = [
    "python3.11 -m venv .venv && . .venv/bin/activate && "
    "pip install -c constraints.txt -e '.[pipeline]' && dvc repro",
    ".venv/bin/python -m pytest",
]
START, END = "<!-- summary:headline:start -->", "<!-- summary:headline:end -->"
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links and code marks reduced to their text, lowercase,
    punctuation dropped (letters, digits, '_', '-' and spaces kept), spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(text: str) -> list[str]:
    return [m.group(2).strip() for line in prose_lines(text)
            if (m := re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line))]


def anchors(text: str) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(text):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(text: str) -> list[str]:
    return [m.group(1) for line in prose_lines(text) for m in LINK.finditer(line)]


def test_slug_follows_github():
    assert slug("1. The problem") == "1-the-problem"
    assert slug("Failure behaviour: fail closed") == "failure-behaviour-fail-closed"
    assert slug("`pipeline.screen` and data/concepts.yaml") == "pipelinescreen-and-dataconceptsyaml"


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; keep it to 300, move the rest to docs/"


def test_readme_starts_with_the_title_and_the_two_commands_in_one_bash_block():
    lines = [line for line in README.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# ")
    assert lines[1] == "```bash"
    assert lines[2:4] == COMMANDS
    assert lines[4] == "```"


def test_readme_table_of_contents_matches_its_headings():
    text = README.read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"##\s+(Contents|Table of contents)\s*$", line))
    toc = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        toc += re.findall(r"\]\(#([^)]+)\)", line)
    assert toc, "the table of contents lists no sections"
    own = anchors(text)
    assert set(toc) <= own, f"contents entries with no heading: {sorted(set(toc) - own)}"
    sections = {slug(h) for h in re.findall(r"^## (.+)$", "\n".join(prose_lines(text)), re.M)}
    sections -= {"contents", "table-of-contents"}
    assert sections <= set(toc), f"sections missing from the contents: {sorted(sections - set(toc))}"


def test_readme_holds_the_summary_headline_markers():
    text = README.read_text()
    assert text.count(START) == 1 and text.count(END) == 1
    assert text.index(START) < text.index(END)
    block = text[text.index(START):text.index(END)]
    assert "|" in block, "the headline block holds no table"
    after = text[text.index(END) + len(END):].lstrip("\n").splitlines()[0]
    assert "reports/summary/README.md" in after


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    text = doc.read_text()
    broken = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = unquote(target).partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


def test_the_docs_exist():
    names = {p.name for p in DOCS}
    assert {"method.md", "pipeline.md", "deploying.md", "reliability.md", "benchmarks.md",
            "fidelity.md", "decisions.md"} <= names
