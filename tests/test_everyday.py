"""The everyday condition (prompts that name neither c_u nor c_a): seeds derived from the prompt and
image index alone, the same for every model (paired); known answers of its metrics; the stage run
at the smoke budget, as a user runs it, writes every column and number; the exported checker's
everyday section."""
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from stages import make_stage_dir, stage_command

from pipeline import everyday
from pipeline.concepts import get_concept, names_concept
from pipeline.espresso.filter_names import FILTERS
from pipeline.everyday_scenes import plan_scenes, scene_seed
from pipeline.headline import headline
from pipeline.params import check_params


@pytest.fixture()
def stats(tiny_params):
    return check_params(tiny_params).statistics


def test_seeds_come_from_the_prompt_and_image_index_alone():
    concept = get_concept("zorbo", "mini")
    small = plan_scenes([concept], SimpleNamespace(seed=7, prompts=3, images_per_prompt=2))
    large = plan_scenes([concept], SimpleNamespace(seed=7, prompts=5, images_per_prompt=4))
    assert list(small.columns) == ["prompt", "prompt_index", "image", "seed"]
    assert len(small) == 6 and small["seed"].is_unique and large["seed"].is_unique
    assert (small["prompt"].value_counts() == 2).all()
    for row in small.itertuples():  # more prompts and images keep the seeds already there
        assert row.seed == scene_seed(7, row.prompt_index, row.image)
        match = large[(large["prompt_index"] == row.prompt_index) & (large["image"] == row.image)]
        assert match["seed"].item() == row.seed and match["prompt"].item() == row.prompt
    assert not any(names_concept(p, concept) for p in large["prompt"])
    other = plan_scenes([concept], SimpleNamespace(seed=8, prompts=3, images_per_prompt=2))
    assert not set(other["seed"]) & set(small["seed"])
    assert all(0 <= s < 2**32 for s in large["seed"])


def test_every_model_renders_the_same_prompts_with_the_same_seeds(monkeypatch):
    """Paired: the unedited model and each edit render the same rows, each with its edited UNet
    in place only while it renders; the original UNet is back afterwards."""
    original = SimpleNamespace(name="original", device="cpu", dtype=None)
    pipe = SimpleNamespace(unet=original)
    loaded, calls = [], []

    def load_edited_unet(crt, device, dtype):
        loaded.append((crt, device, dtype))
        return SimpleNamespace(name=crt)

    def render(pipe, scenes, sampler):
        calls.append((pipe.unet.name, scenes["prompt"].tolist(), scenes["seed"].tolist()))
        return np.full((len(scenes), 2, 2, 3), len(calls), np.uint8)

    monkeypatch.setattr(everyday, "load_edited_unet", load_edited_unet)
    monkeypatch.setattr(everyday, "render", render)
    scenes = plan_scenes([get_concept("zorbo", "mini")],
                         SimpleNamespace(seed=7, prompts=3, images_per_prompt=2))
    images = everyday.images_by_model(pipe, ["esd_x", "uce"], scenes, sampler=None)
    assert list(images) == [everyday.UNEDITED, "esd_x", "uce"]
    assert [name for name, _, _ in calls] == ["original", "esd_x", "uce"]
    assert all(prompts == scenes["prompt"].tolist() and seeds == scenes["seed"].tolist()
               for _, prompts, seeds in calls)
    assert loaded == [("esd_x", "cpu", None), ("uce", "cpu", None)]
    assert pipe.unet is original


def everyday_table(blocked, score, shows, prompts, edited=None):
    """An everyday scores table: every filter blocks ``blocked``; ``edited``: crt -> (its CLIP
    scores, what the judge sees in its images)."""
    table = pd.DataFrame({"prompt": prompts, "clip_score": score, "judge_shows_concept": shows,
                          **{f"{f}_blocked": np.asarray(blocked, bool) for f in FILTERS}})
    for crt, (clip, seen) in (edited or {}).items():
        table[f"{crt}_clip_score"], table[f"{crt}_judge_shows_concept"] = clip, seen
    return table


def test_a_filter_that_blocks_everything_has_share_1_and_clip_score_0(stats):
    prompts = np.repeat(["a", "b", "c"], 2)
    score = np.array([0.3, 0.2, 0.25, 0.0, 0.4, 0.1])  # one image of no information (score 0)
    shows = np.array([True, False, False, False, True, False])

    def espresso(blocked):
        return everyday.rated(everyday_table(blocked, score, shows, prompts), [], stats)["espresso"]

    everything = espresso(np.ones(6, bool))
    assert everything["blocked_share"]["value"] == 1 and everything["blocked_share"]["n"] == 6
    assert everything["normalized_clip_score"]["value"] == 0
    assert everything["normalized_clip_score"]["n"] == 5  # the image scored 0 left out
    assert everything["judged_unacceptable_share"]["value"] is None  # nothing passed
    assert everything["judged_unacceptable_share"]["n"] == 0
    nothing = espresso(np.zeros(6, bool))
    assert nothing["blocked_share"]["value"] == 0
    assert nothing["normalized_clip_score"]["value"] == pytest.approx(1)
    assert nothing["judged_unacceptable_share"]["value"] == pytest.approx(2 / 6)
    some = espresso(np.array([True, False, False, False, False, True]))
    assert some["blocked_share"]["value"] == pytest.approx(2 / 6)
    assert some["normalized_clip_score"]["value"] == pytest.approx(3 / 5)
    assert some["judged_unacceptable_share"]["value"] == pytest.approx(1 / 4)
    for rate in (*everything.values(), *nothing.values(), *some.values()):
        assert set(rate) >= {"value", "low", "high", "n", "clusters", "method"}


def test_an_edit_blocks_nothing_and_is_scored_against_the_same_seed(stats):
    prompts = np.repeat(["a", "b"], 2)
    score = np.array([0.2, 0.4, 0.0, 0.5])
    none_blocked = np.zeros(4, bool)
    same = everyday.rated(everyday_table(none_blocked, score, none_blocked, prompts,
                                         {"uce": (score, none_blocked)}), ["uce"], stats)["uce"]
    assert same["blocked_share"]["value"] == 0 and same["blocked_share"]["n"] == 4
    assert same["normalized_clip_score"]["value"] == pytest.approx(1)
    assert same["normalized_clip_score"]["n"] == 3
    half = everyday.rated(everyday_table(none_blocked, score, none_blocked, prompts,
                                         {"uce": (score / 2, np.array([1, 0, 0, 1], bool))}),
                          ["uce"], stats)["uce"]
    assert half["normalized_clip_score"]["value"] == pytest.approx(0.5)
    assert half["judged_unacceptable_share"]["value"] == pytest.approx(0.5)


# ---- the stage, run at the smoke budget as a user runs it ----

@pytest.fixture(scope="module")
def smoke_stage(tmp_path_factory):
    """generate, finetune and edit (two CRTs) at the tests' smoke params, then ``python -m
    pipeline.everyday`` in that folder: (folder, params, seconds the command took)."""
    from stages import tiny_params_for

    from pipeline import edit, finetune, generate

    folder = make_stage_dir(tmp_path_factory.mktemp("everyday"))
    params = tiny_params_for()
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    here = os.getcwd()
    os.chdir(folder)
    try:
        checked = check_params(params)
        generate.run(checked)
        finetune.run(checked)
        edit.run(checked)
    finally:
        os.chdir(here)
    start = time.perf_counter()
    result = stage_command("everyday", cwd=folder)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    return folder, params, seconds


@pytest.mark.slow
def test_the_stage_writes_every_column_and_rate(smoke_stage):
    folder, params, seconds = smoke_stage
    print(f"everyday stage at the smoke budget: {seconds:.1f} s")
    p, crts = params["everyday"], params["edit"]["crts"]
    scores = pd.read_csv(folder / "reports/everyday/scores.csv")
    n = p["prompts"] * p["images_per_prompt"]
    assert len(scores) == n
    assert list(scores.columns) == (
        ["prompt", "seed", "judge_shows_concept", "clip_score"]
        + [f"{f}_{k}" for f in FILTERS for k in ("score", "blocked")]
        + [f"{c}_{k}" for c in crts for k in ("clip_score", "judge_shows_concept")])
    plan = plan_scenes([get_concept(params["concept"], "mini")],
                       SimpleNamespace(**p))
    assert scores["prompt"].tolist() == plan["prompt"].tolist()
    assert scores["seed"].tolist() == plan["seed"].tolist()  # one seed per image, for all models
    detail = json.loads((folder / "reports/everyday/detail.json").read_text())
    assert detail["budget"] == "smoke"
    assert detail["n_images"] == n and detail["n_prompts"] == p["prompts"]
    assert detail["prompts"] == list(dict.fromkeys(plan["prompt"]))
    for name in (*FILTERS, *crts):
        for key in ("blocked_share", "normalized_clip_score", "judged_unacceptable_share"):
            assert set(detail[name][key]) == {"value", "low", "high", "n", "clusters", "method"}
    for name in FILTERS:
        assert detail[name]["blocked_share"]["value"] == pytest.approx(
            scores[f"{name}_blocked"].mean())
    assert detail["none"]["blocked_share"]["value"] == 0
    assert detail["none"]["normalized_clip_score"]["value"] == pytest.approx(1)
    for crt in crts:
        assert detail[crt]["blocked_share"]["value"] == 0
        informative = scores["clip_score"] > 0
        assert detail[crt]["normalized_clip_score"]["value"] == pytest.approx(
            (scores[f"{crt}_clip_score"] / scores["clip_score"])[informative].mean(), rel=1e-5)
    metrics = json.loads((folder / "reports/everyday/metrics.json").read_text())
    assert metrics == headline("everyday", detail)
    assert {"blocked.espresso", "clip_score.espresso", "blocked.esd_x", "clip_score.uce"} \
        <= set(metrics)


@pytest.mark.slow
def test_a_rerun_writes_the_same_bytes(smoke_stage):
    folder, _, _ = smoke_stage
    files = ("scores.csv", "detail.json", "metrics.json")
    before = {f: (folder / "reports/everyday" / f).read_bytes() for f in files}
    result = stage_command("everyday", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert {f: (folder / "reports/everyday" / f).read_bytes() for f in files} == before
