"""The cross-concept summary: clustered rates, averages with the concepts' spread, verdicts on
the judge's numbers with the whole interval, paired claims under Holm, rebuilt from main."""
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from experiment_records import PROFILE, git, publish, score_tables
from pipeline import rendering, summary
from pipeline.params import check_params, load_params

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "reports" / "summary"


def test_summary_is_one_row_per_concept_crt_condition_metric(summary_folder):
    folder, tables = summary_folder
    long = pd.read_csv(folder / "summary.csv")
    assert set(long["concept"]) == {*tables, "average"}
    assert {"clean", "everyday", "worst+", "pez+", "cce+", "pez", "cce"} <= set(long["condition"])
    leak = long[(long["crt"] == "espresso") & (long["metric"] == "leak_rate_judged")]
    # Espresso blocks every c_u image: 0 of 16 prompts, an exact bound on 16 prompts, not 32 images
    zorbo = leak[leak["concept"] == "zorbo"].iloc[0]
    assert zorbo["value"] == 0 and zorbo["method"] == "exact" and zorbo["clusters"] == 16
    assert zorbo["high"] == pytest.approx(1 - 0.025 ** (1 / 16))
    average = leak[leak["concept"] == "average"].iloc[0]
    assert average["clusters"] == 3 and average["high"] == pytest.approx(1 - 0.025 ** (1 / 48))
    index = pd.read_csv(folder / "experiments.csv", dtype=str)
    assert list(index["concept"]) == list(tables)


def test_the_verdict_needs_the_whole_interval_on_the_judges_numbers(summary_folder, tiny_params):
    folder, _ = summary_folder
    long, claims, *_ = summary.read_summary(folder)
    claim = check_params(tiny_params).summary.claim
    table = summary.verdict_table(long, claim)
    espresso = table.loc["Espresso fine-tuned"]
    # blocks every c_u and attack image, passes every other: met on the average (48 prompts) ...
    assert espresso[summary.ALL_THREE] == "yes"
    # ... but on no single concept: 0 of 16 prompts leaves an upper bound of 0.21 > 0.10
    assert espresso["concepts meeting all three"] == "0 of 3"
    per_concept = summary.per_concept_verdicts(long, claim)
    assert set(per_concept.loc["Espresso fine-tuned"]) == {"no: e u r"}
    zero_shot = table.loc["Espresso zero-shot"]  # blocks 30% of everyday images
    assert zero_shot["useful"] == "no" and zero_shot["effective"] != "no"
    assert table.loc["SD safety checker (diffusers, calibrated)", summary.ALL_THREE] == "no"
    assert "no filter (reference, not a CRT)" not in table.index


def test_claims_are_paired_and_controlled_as_one_family(summary_folder, tiny_params):
    folder, _ = summary_folder
    _, claims, *_ = summary.read_summary(folder)
    # every pair of the 6 CRTs (references aside) on 3 criteria, and of the 5 with adapted
    # attacks (no "+" run targets the safety checker here) on the worst one
    assert len(claims) == 3 * 15 + 10
    assert (claims["p_adjusted"] >= claims["p"] - 1e-12).all()
    # six concepts: a difference of ~0.5 on every one survives Holm over the whole family;
    # the same profile drawn twice (mhsc made zero-shot's twin) never does
    from pipeline import outcomes

    stats = check_params(tiny_params).statistics
    twin = {**PROFILE, "mhsc": PROFILE["zero_shot"]}
    per_concept = {c: outcomes.outcomes(*score_tables(s, prompts=16, images=2, profile=twin).values(),
                                        stats) for s, c in enumerate("abcdef")}
    six = summary.claims_table(per_concept, stats)
    leak = six[six["metric"] == "leak_rate_judged"]
    pair = leak[(leak["a"] == "safety_checker") & (leak["b"] == "espresso")].iloc[0]
    assert pair["holds"] and pair["better"] == "espresso" and pair["difference"] > 0.4
    same = six[(six["a"] == "mhsc") & (six["b"] == "zero_shot")]
    assert len(same) == 4 and not same["holds"].any()


def test_the_summary_is_rebuilt_from_main_alone(tmp_path, monkeypatch, capsys):
    """Published commits on a clone with no experiment refs: the newest per concept is read;
    a commit of an older format (no everyday scores) and one of another sweep are skipped with
    one line each; experiments.csv says which commit each concept comes from."""
    params = load_params(REPO / "params.yaml").model_dump(exclude_unset=True)
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    # the concept registry and the paper's figures
    shutil.copytree(REPO / "data", repo / "data", ignore=shutil.ignore_patterns("world", "checker"))
    old = publish(repo, "zorbo", params, score_tables(0, prompts=4, images=2))
    new = publish(repo, "zorbo", params, score_tables(1, prompts=4, images=2))
    blip = publish(repo, "blip", params, score_tables(2, prompts=4, images=2))
    older_format = score_tables(3, prompts=4, images=2)
    older_format.pop("everyday")
    (repo / "reports" / "everyday" / "scores.csv").unlink()
    publish(repo, "mimi", params, older_format)
    other = {**params, "everyday": {**params["everyday"], "prompts": 5}}
    publish(repo, "kroll", other, score_tables(4, prompts=4, images=2))
    (repo / "README.md").write_text("\n".join(summary.HEADLINE_MARKERS) + "\n")
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "concept": "zorbo"}))
    monkeypatch.chdir(repo)
    summary.main([])
    said = capsys.readouterr().out
    assert "skipped exp(mimi)" in said and "older results format" in said
    assert "skipped exp(kroll)" in said and "another sweep" in said
    index = pd.read_csv(repo / "reports/summary/experiments.csv", dtype=str)
    assert dict(zip(index["concept"], index["commit"])) == {"zorbo": new, "blip": blip}
    assert old not in set(index["commit"])
    long = pd.read_csv(repo / "reports/summary/summary.csv")
    assert set(long["concept"]) == {"zorbo", "blip", "average"}
    assert summary.readme_block((repo / "README.md").read_text()).startswith("Verdict:")


def test_render_gives_the_page_again_from_its_csv_files(summary_folder, tiny_params, tmp_path):
    folder, _ = summary_folder
    again = tmp_path / "again"
    again.mkdir()
    for name in ("summary.csv", "claims.csv", "experiments.csv", "curves.csv"):
        shutil.copy(folder / name, again / name)
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\n" + "\n".join(summary.HEADLINE_MARKERS) + "\n\nmore\n")
    checked = check_params(tiny_params)
    summary.write_summary(again, checked, *summary.read_summary(again), readme=readme)
    for name in ("README.md", "index.html", "summary.csv", "claims.csv"):
        assert (again / name).read_text() == (folder / name).read_text(), name
    block = summary.readme_block(readme.read_text())
    header, rule, *rows = [line for line in block.splitlines() if line.startswith("|")]
    assert header.count("|") - 1 <= 9  # compact: the README is short
    assert [row.split("|")[1].strip() for row in rows] == [
        rendering.FILTER_NAMES[n] for n in PROFILE if n not in rendering.REFERENCES]


def test_the_readme_headline_table_is_the_committed_summary():
    block = summary.readme_block((REPO / "README.md").read_text())
    assert block is not None, f"README.md lacks the markers {summary.HEADLINE_MARKERS}"
    params = load_params(REPO / "params.yaml")
    long, claims, _, curves = summary.read_summary(COMMITTED)
    assert block == summary.headline_markdown(long, claims, curves, params)


@pytest.mark.slow
def test_the_committed_summary_page_is_its_csv_files_rendered(tmp_path, monkeypatch):
    again = tmp_path / "summary"
    again.mkdir()
    for name in ("summary.csv", "claims.csv", "experiments.csv", "curves.csv"):
        shutil.copy(COMMITTED / name, again / name)
    monkeypatch.chdir(REPO)  # params.yaml: the claim the committed verdict is judged against
    summary.main(["--render", "--out", str(again), "--readme", str(tmp_path / "README.md")])
    for name in ("README.md", "index.html"):
        assert (again / name).read_text() == (COMMITTED / name).read_text(), name


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
      body.colours = ['yes', 'point', 'no'].map(
        c => getComputedStyle(document.querySelector('td.' + c)).color).join(';');
    });</script></body>"""))
    shutil.copy(folder / "tradeoff.png", tmp_path / "tradeoff.png")
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
         "--disable-background-networking", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-overflow="false"' in dom and 'data-figure="true"' in dom
    assert 'data-colours="rgb(26, 127, 55);rgb(154, 103, 0);rgb(207, 34, 46)"' in dom
    # the page opens with the verdict and the trade-off figure, then the verdict table
    opening = [dom.index(mark) for mark in ("<h1>", "<p>Verdict:", '<img src="tradeoff.png"',
                                            "<h2>Verdict: which CRTs", "<p>Setting:")]
    assert opening == sorted(opening)


def test_budget_curves_say_which_attacks_converged(tiny_params, tmp_path):
    """A concept whose attack table holds a half budget: where the half budget's images are the
    full budget's (the same success) the attack converged; where at half budget nothing showed
    c_u it did not. The curves are drawn and the README says which converged."""
    checked = check_params(tiny_params)
    tables = {c: score_tables(seed, prompts=16, images=2) for seed, c in enumerate(("zorbo", "blip"))}
    full = tables["zorbo"]["attack"].assign(budget=1.0)
    half = full.assign(budget=0.5)
    weak = half["attack"] == "pez"
    half.loc[weak, "judge_shows_concept"] = False  # half PEZ's budget draws no c_u
    tables["zorbo"]["attack"] = pd.concat([half, full], ignore_index=True).assign(on_curve=True)
    curves = summary.curves_table(tables, checked.statistics)
    # the full budget's other images (off the curve) change none of its points
    off = full.assign(on_curve=False, judge_shows_concept=False)
    with_off = {**tables, "zorbo": {**tables["zorbo"], "attack": pd.concat(
        [tables["zorbo"]["attack"], off], ignore_index=True)}}
    pd.testing.assert_frame_equal(summary.curves_table(with_off, checked.statistics), curves)
    assert set(curves["concept"]) == {"zorbo"}  # blip drew no curve
    at_full = curves[curves["budget"] == 1.0].set_index(["crt", "condition"])["converged"]
    assert at_full["none", "cce"] and at_full["espresso", "cce+"]
    assert not at_full["none", "pez"]  # 0 at half budget, well below the full budget's interval
    assert curves[curves["budget"] == 0.5]["converged"].isna().all()
    long, claims = summary.long_table(tables, checked.statistics, {})
    # the full budget's outcomes are those of the table without the half budget
    alone, _ = summary.long_table({"zorbo": {**tables["zorbo"],
                                             "attack": full.assign(on_curve=True)},
                                   "blip": tables["blip"]}, checked.statistics, {})
    pd.testing.assert_frame_equal(long, alone)
    index = pd.DataFrame(columns=["concept", "commit"])
    summary.write_summary(tmp_path / "s", checked, long, claims, index, curves)
    assert (tmp_path / "s" / "curves.png").is_file()
    sentence = summary.convergence_sentence(curves)
    assert "1 concept(s) (zorbo" in sentence
    done, total = map(int, re.search(r"\bpez (\d+)/(\d+)", sentence).groups())
    assert done < total and "pez," not in sentence.split("every CRT:")[1]
    assert sentence in (tmp_path / "s" / "README.md").read_text()
