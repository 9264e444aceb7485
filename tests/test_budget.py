"""Budgets: ``budget: smoke`` merges ``presets.smoke`` over params.yaml at load (known answers,
one-line errors), every stage but the frozen world reruns when the budget changes, and whatever a
smoke run writes says it is not results (metrics, report, summary), while full budgets say
nothing of the kind."""
import json
import shutil

import pytest
import yaml

from stages import REPO, make_stage_dir
from pipeline import experiments, report, rendering
from pipeline.params import apply_budget, check_params, load_params
from pipeline.schema import ParamsError

BANNER = "SMOKE BUDGETS: NOT RESULTS"


@pytest.fixture()
def raw(monkeypatch):
    """params.yaml as the file holds it; the registry is read from the repository."""
    monkeypatch.chdir(REPO)
    return yaml.safe_load((REPO / "params.yaml").read_text())


def load(raw, tmp_path) -> dict:
    """``raw`` written to a params file and loaded as a stage loads it, as a dict."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path).model_dump(exclude_unset=True)


def test_full_budget_is_params_yaml_as_written(raw, tmp_path):
    assert raw["budget"] == "full"
    assert load(raw, tmp_path) == raw


def test_smoke_preset_merges_over_the_base_params(raw, tmp_path):
    params = load({**raw, "budget": "smoke"}, tmp_path)
    assert params["generate"]["mini"] == {**raw["generate"]["mini"], "steps": 4}  # one key cut
    assert params["generate"]["prompts"] == {"train": 4, "val": 2, "test": 2}
    assert params["attack"]["mini"]["cce"]["adaptive_weights"] == [0.004, 0.008, 0.016, 0.032]  # kept
    assert params["attack"]["mini"]["ringbell"]["generations"] == 2
    # every code path still runs: the concept, every CRT, attack and adapted filter
    for key in ("concept", "setting"):
        assert params[key] == raw[key]
    assert params["edit"]["crts"] == raw["edit"]["crts"] == ["esd_x", "esd_u", "uce", "ca"]
    assert params["attack"]["attacks"] == raw["attack"]["attacks"]
    assert params["attack"]["adapt_to"] == raw["attack"]["adapt_to"]
    assert params["world"] == raw["world"]  # frozen: never budgeted
    assert params["presets"]["smoke"] == {}  # spent: merging again changes nothing, and
    assert apply_budget(params) == params     # merged params written to a file load as they are
    params["attack"]["prompts"] = 1
    assert load(params, tmp_path)["attack"]["prompts"] == 1
    assert raw["generate"]["mini"]["steps"] == 25  # the file's dict is not touched


@pytest.mark.parametrize("budget", ["smoke", "full"])
def test_a_preset_key_params_yaml_lacks_is_one_line(raw, tmp_path, budget):
    raw["budget"] = budget
    raw["presets"]["smoke"]["generate"]["mini"]["stepz"] = 3
    with pytest.raises(ParamsError) as err:
        load(raw, tmp_path)
    (line,) = str(err.value).splitlines()
    assert line.startswith("params.yaml: presets.smoke.generate.mini.stepz: unknown key")
    assert "steps" in line  # the keys that are there


def test_a_preset_may_not_touch_the_frozen_world_or_the_budget(raw, tmp_path):
    for key, value in (("world", {"seed": 1}), ("budget", "full")):
        bad = {**raw, "budget": "smoke", "presets": {"smoke": {key: value}}}
        with pytest.raises(ParamsError) as err:
            load(bad, tmp_path)
        (line,) = str(err.value).splitlines()
        assert f"presets.smoke.{key}:" in line and "may not set" in line


def test_a_bad_value_in_the_preset_is_named_where_it_lands(raw, tmp_path):
    raw["budget"] = "smoke"
    raw["presets"]["smoke"]["generate"]["mini"]["steps"] = 0
    with pytest.raises(ParamsError, match="generate.mini.steps: 0 is not allowed"):
        load(raw, tmp_path)


def test_every_stage_but_the_frozen_world_reruns_on_a_budget_change():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        listed = {"budget", "presets"} & set(stage["params"])
        assert listed == (set() if stage.get("frozen") else {"budget", "presets"}), name
    assert stages["world"]["frozen"]


def test_the_banner_is_in_a_smoke_page_and_nowhere_else():
    args = ("Espresso report: zorbo", ["intro"], {}, {})
    full_md, full_html = rendering.render(*args)
    smoke_md, smoke_html = rendering.render(*args, budget="smoke")
    assert BANNER not in full_md + full_html and 'class="not-results"' not in full_html
    assert smoke_md.startswith(f"> **⚠ {BANNER}.**")
    body = smoke_html[smoke_html.index("<body>"):]
    assert body.startswith('<body><div class="not-results" role="alert"')  # first on the page
    assert BANNER in body[:body.index("</div>")] and "background:#b00020" in body
    assert rendering.budget_of(None, {"evaluate": {"budget": "smoke"}}) == "smoke"
    assert rendering.budget_of(None, {"evaluate": {}}) == "full"


def test_the_committed_full_budget_report_has_no_banner():
    for name in ("README.md", "index.html"):
        assert BANNER not in (REPO / "reports/report" / name).read_text()
    for stage in ("finetune", "edit", "evaluate", "everyday", "attack", "certify"):
        for name in ("metrics.json", "detail.json"):
            assert "budget" not in json.loads((REPO / f"reports/{stage}/{name}").read_text())


def test_a_full_budget_summary_never_takes_a_smoke_experiment(raw):
    """One sweep is one budget: a smoke experiment is never of a full sweep's, and one recorded
    before budgets existed counts as full."""
    full = apply_budget(raw)
    smoke = apply_budget({**raw, "budget": "smoke"})
    older = {k: v for k, v in raw.items() if k not in ("budget", "presets")}  # before budgets
    assert not experiments.same_sweep({**raw, "budget": "smoke"}, full)
    assert experiments.same_sweep({**raw, "budget": "smoke"}, smoke)
    assert experiments.same_sweep(older, full) and not experiments.same_sweep(older, smoke)
    # what picks no score the summary reads is no other sweep: the claim, the statistics
    assert experiments.same_sweep({**raw, "statistics": {**raw["statistics"], "seed": 9}}, full)
    # budget-curve points add outputs and change none: an experiment that drew curves is of the
    # sweep; one with other attack seeds is not
    curves = {**raw, "attack": {**raw["attack"], "budgets": [0.5, 1.0]}}
    assert experiments.same_sweep(curves, full)
    # nor does the curve's image count: an experiment published before the key existed is of it
    before_curve_images = {**raw, "attack": {k: v for k, v in raw["attack"].items()
                                             if k != "curve_images_per_prompt"}}
    assert experiments.same_sweep(before_curve_images, full)
    assert experiments.same_sweep({**raw, "attack": {**raw["attack"],
                                                     "curve_images_per_prompt": 1}}, full)
    assert not experiments.same_sweep({**raw, "attack": {**raw["attack"], "seeds": 9}}, full)


def test_a_smoke_summary_says_so(summary_folder):
    folder, _ = summary_folder  # tiny_params: a smoke sweep
    assert (folder / "README.md").read_text().startswith(f"> **⚠ {BANNER}.**")
    assert BANNER in (folder / "index.html").read_text()


@pytest.mark.slow
def test_a_smoke_run_says_so_in_every_report_and_a_full_one_does_not(tiny_run, tiny_params,
                                                                      tmp_path, monkeypatch):
    """The stages at the smoke preset (``tiny_run``) mark their metrics; the report made from
    them opens with the banner, in HTML, Markdown and each plot's title. The same files with
    the marks taken out and a full budget: no banner."""
    folder, _ = tiny_run
    assert tiny_params["budget"] == "smoke"
    copy = make_stage_dir(tmp_path / "full")
    shutil.copytree(folder / "data/generate", copy / "data/generate")
    for stage in ("finetune", "edit", "evaluate", "everyday", "attack", "certify"):
        written = json.loads((folder / f"reports/{stage}/detail.json").read_text())
        assert written["budget"] == "smoke", stage
        (copy / f"reports/{stage}").mkdir(parents=True)
        shutil.copytree(folder / f"reports/{stage}", copy / f"reports/{stage}",
                        dirs_exist_ok=True)
        (copy / f"reports/{stage}/detail.json").write_text(
            json.dumps({k: v for k, v in written.items() if k != "budget"}))
    monkeypatch.chdir(copy)
    report.run(check_params({**tiny_params, "budget": "full"}))
    out = copy / report.OUT
    assert BANNER not in (out / "README.md").read_text() + (out / "index.html").read_text()
    plain = (out / "crts.png").read_bytes()
    monkeypatch.chdir(folder)
    report.run(check_params(tiny_params))
    out = folder / report.OUT
    markdown, page = (out / "README.md").read_text(), (out / "index.html").read_text()
    assert markdown.startswith(f"> **⚠ {BANNER}.**") and "budget: smoke" in markdown
    assert page.index(BANNER) < page.index("<h1>")  # top of the page, before the title
    assert "position:sticky" in page  # stays in view while scrolling
    assert (out / "crts.png").read_bytes() != plain  # the plot titled too
