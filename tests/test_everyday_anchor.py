"""Images of neither concept (docs/method.md, "Images of neither concept"): the everyday anchor
t_n gates each concept, in the single filter and the checker alike; the everyday cuts are
calibrated together by split conformal; a checker with anchors saves, loads and is validated.

Known answers: the gate score equals sigmoid(s (<e, t_u> - max_j <e, t_n,j>)) computed here
from the CLIP's own embeddings; on the mini world the zero-shot ``on a black background`` filter
blocks many brown and gray scenes by the paper's rule alone, and the anchors pass most of them
while they still block black ones."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import world
from pipeline.concepts import everyday_prompts, get_concept, known_concepts
from pipeline.espresso import ConceptChecker, EspressoFilter, ModelNotAvailableError, load_clip
from pipeline.espresso.checker import conformal_everyday_cuts
from pipeline.espresso.embeddings import text_embeddings
from pipeline.mini import shapes

CONCEPTS = [get_concept(name, "mini") for name in known_concepts("mini")]


@pytest.fixture(scope="module")
def clip():
    return load_clip(str(world.CLIP_DIR), device="cpu")


@pytest.fixture(scope="module")
def everyday():
    """Ordinary prompts that name none of the mini concepts."""
    return everyday_prompts(CONCEPTS, 48, seed=11)


@pytest.fixture(scope="module")
def backgrounds():
    """24 scenes on each background, without characters."""
    rng = np.random.default_rng(3)
    return {b: shapes.render_many([shapes.sample_scene(rng, character_prob=0.0, background=b)
                                   for _ in range(24)], rng) for b in shapes.BACKGROUNDS}


def black_filter(clip, everyday=None, everyday_cut=0.5):
    concept = get_concept("black_background", "mini")
    return EspressoFilter(*clip, concept.unacceptable, concept.acceptable, everyday=everyday,
                          everyday_cut=everyday_cut)


def test_the_gate_score_is_the_sigmoid_of_the_margin_against_the_nearest_everyday_text(
        clip, everyday, backgrounds):
    filt = black_filter(clip, everyday)
    model, tokenizer, _ = clip
    t_n = F.normalize(text_embeddings(model, tokenizer, everyday), dim=-1)
    images = np.concatenate(list(backgrounds.values()))
    e = F.normalize(filt.embed(images), dim=-1)
    nearest = torch.stack([e @ t for t in t_n]).max(0).values
    expected = torch.sigmoid(filt.logit_scale * (e @ filt.t_u - nearest)).numpy()
    result = filt.screen(images)
    assert np.allclose(result.p_vs_everyday, expected, atol=1e-5)
    # the decision is both conditions, nothing else
    assert np.array_equal(result.blocked, (result.p_unacceptable > 0.5) & (expected > 0.5))


def test_the_anchor_passes_backgrounds_of_neither_concept_and_still_blocks_black(
        clip, everyday, backgrounds):
    paper, anchored = black_filter(clip), black_filter(clip, everyday)
    blocked = {b: (paper.screen(im).blocked.mean(), anchored.screen(im).blocked.mean())
               for b, im in backgrounds.items()}
    neither = [blocked[b] for b in ("brown", "gray")]
    assert np.mean([p for p, _ in neither]) > 0.3          # the paper's rule: arbitrary verdicts
    assert np.mean([a for _, a in neither]) < 0.5 * np.mean([p for p, _ in neither])
    assert blocked["black"][1] >= 0.6 and blocked["white"] == (0.0, 0.0)  # zero-shot, gate 0.5
    # without everyday texts the filter is the paper's, to the bit
    assert paper.screen(backgrounds["brown"]).p_vs_everyday is None


def test_checker_decisions_equal_the_anchored_single_filters(clip, everyday, backgrounds):
    filters = {c.name: EspressoFilter(*clip, c.unacceptable, c.acceptable, everyday=everyday,
                                      everyday_cut=0.4 + 0.03 * k)
               for k, c in enumerate(CONCEPTS)}
    checker = ConceptChecker.from_filters(filters)
    images = np.concatenate(list(backgrounds.values()))
    result = checker.check(images)
    for k, filt in enumerate(filters.values()):
        single = filt.screen(images)
        assert np.array_equal(result.fired[:, k], single.blocked), filt.unacceptable
        assert np.allclose(result.p_vs_everyday[:, k], single.p_vs_everyday, atol=1e-5)


def test_an_anchored_checker_round_trips_and_a_changed_folder_is_refused(
        clip, everyday, backgrounds, tmp_path):
    checker = ConceptChecker.from_clip(str(world.CLIP_DIR), {
        c.name: (c.unacceptable, c.acceptable) for c in CONCEPTS[:3]}, everyday=everyday)
    checker.concepts[0].t_n = None          # one concept without anchor: a zero row on disk
    checker.concepts[0].everyday_cut = checker.concepts[0].everyday = None
    checker = ConceptChecker(checker.image_encoder, checker.processor, checker.concepts)
    checker.save_pretrained(tmp_path / "c")
    loaded = ConceptChecker.from_pretrained(tmp_path / "c", device="cpu")
    images = np.concatenate(list(backgrounds.values()))
    a, b = checker.check(images), loaded.check(images)
    assert np.array_equal(a.fired, b.fired) and np.array_equal(a.p_vs_everyday, b.p_vs_everyday)
    assert (b.p_vs_everyday[:, 0] == 1).all() and loaded.everyday_cuts[0] == 0
    assert "everyday cut" in (tmp_path / "c" / "README.md").read_text()
    for change, match in ((lambda r: r.update(everyday_cut=1.0), r"everyday_cut"),
                          (lambda r: r.update(everyday_cut="0.5"), r"everyday_cut")):
        shutil.copytree(tmp_path / "c", tmp_path / "bad", dirs_exist_ok=True)
        config = json.loads((tmp_path / "c" / "config.json").read_text())
        change(config["concept_table"][1])
        (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelNotAvailableError, match=match):
            ConceptChecker.from_pretrained(tmp_path / "bad", device="cpu")


def test_a_version_1_checker_loads_as_the_paper_rule(tmp_path, clip):
    checker = ConceptChecker.from_clip(str(world.CLIP_DIR), {"zorbo": ("Zorbo", "a star")})
    checker.save_pretrained(tmp_path / "v1")
    config = json.loads((tmp_path / "v1" / "config.json").read_text())
    config["format_version"] = 1
    for row in config["concept_table"]:
        del row["everyday_cut"], row["everyday"]
    (tmp_path / "v1" / "config.json").write_text(json.dumps(config))
    loaded = ConceptChecker.from_pretrained(tmp_path / "v1", device="cpu")
    assert loaded.concepts[0].t_n is None and loaded.everyday_cuts.tolist() == [0.0]


def planted(rng, n_groups, per_group):
    """Everyday scores of one anchored concept whose c_u-vs-c_a rule fires on every image:
    gate scores uniform, a group's images sharing a group effect (the clustering)."""
    effect = rng.uniform(size=(n_groups, 1))
    gate = 0.5 * effect + 0.5 * rng.uniform(size=(n_groups, per_group))
    return gate.ravel(), np.repeat(np.arange(n_groups), per_group)


def test_conformal_cuts_have_the_known_rank_and_cover_fresh_groups():
    rng = np.random.default_rng(0)
    positives = {0: np.sort(rng.uniform(0.5, 1.0, size=200))}
    # known answer: 99 groups at 1% -> the largest group score is lambda
    gate, groups = planted(rng, 99, 3)
    lam, cuts = conformal_everyday_cuts(np.ones((len(gate), 1), bool), gate[:, None],
                                        np.zeros(len(gate), bool), groups, positives, 0.01,
                                        ["c"])
    shares = np.searchsorted(positives[0], gate, side="right") / 200
    assert lam == pytest.approx(max(shares[groups == g].max() for g in range(99)))
    assert (positives[0] >= np.nextafter(cuts[0], 1)).mean() == pytest.approx(
        1 - np.floor(lam * 200) / 200)
    with pytest.raises(ValueError, match="at least 99 groups"):
        conformal_everyday_cuts(np.ones((len(gate), 1), bool), gate[:, None],
                                np.zeros(len(gate), bool), groups % 50, positives, 0.01, ["c"])
    # coverage: over many calibrations, a fresh group is blocked at most target of the time
    # (and not far below it: the guarantee is tight to 1/(n+1))
    fresh_blocked, positives = [], {0: np.sort(rng.uniform(0, 1.5, size=200))}
    for _ in range(300):
        gate, groups = planted(rng, 60, 3)
        lam, cuts = conformal_everyday_cuts(np.ones((len(gate), 1), bool), gate[:, None],
                                            np.zeros(len(gate), bool), groups, positives, 0.1,
                                            ["c"])
        new, new_groups = planted(rng, 200, 3)
        fresh_blocked.append(np.mean([(new[new_groups == g] > cuts[0]).any()
                                      for g in range(200)]))
    assert 0.1 - 1 / 61 - 0.01 <= np.mean(fresh_blocked) <= 0.1 + 0.01


def test_an_unscored_everyday_image_cannot_be_calibrated_away():
    positives = {0: np.linspace(0.5, 1, 50)}
    fires, gate = np.ones((10, 1), bool), np.full((10, 1), 0.2)
    unscored = np.zeros(10, bool)
    unscored[:2] = True
    with pytest.raises(ValueError, match="blocked whatever the everyday cuts"):
        conformal_everyday_cuts(fires, gate, unscored, np.arange(10), positives, 0.1, ["c"])


def test_calibrate_everyday_reaches_its_target_on_the_mini_world(clip, everyday, backgrounds):
    checker = ConceptChecker.from_filters({"black_background": black_filter(clip, everyday)})
    negatives = np.concatenate([backgrounds[b] for b in ("brown", "gray", "white")])
    groups = np.arange(len(negatives))
    before = checker.check(negatives).blocked.mean()
    record = checker.calibrate_everyday(negatives, {"black_background": backgrounds["black"]},
                                        0.05, groups)
    after = checker.check(negatives).blocked.mean()
    assert record["groups"] == 72 and record["blocked_images"] == pytest.approx(after)
    assert after <= 0.05 < before
    calibration = checker.concepts[0].everyday["calibration"]
    gated = calibration["validation_unacceptable_gated"]   # the share lambda costs c_u
    assert gated == pytest.approx(np.floor(record["lambda"] * 24) / 24)
    black = checker.check(backgrounds["black"])
    assert gated == pytest.approx((black.p_vs_everyday[:, 0] <= checker.everyday_cuts[0]).mean())
