"""Images of neither concept (docs/method.md, "Images of neither concept"): the everyday anchor
t_n gates each concept, in the single filter and the checker alike; the everyday cuts are
calibrated together by split conformal; a checker with anchors saves, loads and is validated.

Known answers: the gate score equals sigmoid(s (<e, t_u> - max_j <e, t_n,j>)) computed here
from the CLIP's own embeddings (with in-context texts t_c, <e, t_u> is the nearest of t_u and
t_c); on the mini world the zero-shot ``on a black background`` filter blocks many brown and gray
scenes by the paper's rule alone, the anchors pass most of them while they still block black
ones, and the in-context texts win back the black scenes the gate alone lets through."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import world
from pipeline.concepts import everyday_draw, everyday_prompts, get_concept, known_concepts
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


@pytest.fixture(scope="module")
def twins():
    """Per concept, the in-context twins of the ``everyday`` fixture's prompts (same draw)."""
    draw = everyday_draw(CONCEPTS, 48, seed=11)
    return {c.name: [p.in_context[c.name] for p in draw if p.in_context[c.name]]
            for c in CONCEPTS}


def black_filter(clip, everyday=None, everyday_cut=0.5, in_context=None):
    concept = get_concept("black_background", "mini")
    return EspressoFilter(*clip, concept.unacceptable, concept.acceptable, everyday=everyday,
                          everyday_cut=everyday_cut, in_context=in_context)


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


def test_in_context_texts_put_the_nearest_whole_caption_on_the_unacceptable_side(
        clip, everyday, twins, backgrounds):
    filt = black_filter(clip, everyday, in_context=twins["black_background"])
    model, tokenizer, _ = clip
    t_n = F.normalize(text_embeddings(model, tokenizer, everyday), dim=-1)
    t_c = F.normalize(text_embeddings(model, tokenizer, twins["black_background"]), dim=-1)
    images = np.concatenate(list(backgrounds.values()))
    e = F.normalize(filt.embed(images), dim=-1)
    unacceptable = torch.maximum(e @ filt.t_u, (e @ t_c.T).max(1).values)
    expected = torch.sigmoid(filt.logit_scale * (unacceptable - (e @ t_n.T).max(1).values))
    assert np.allclose(filt.screen(images).p_vs_everyday, expected.numpy(), atol=1e-5)


def test_in_context_texts_win_back_black_scenes_and_keep_the_others_out(clip, everyday, twins):
    """Black-background scenes of every kind (characters too): the gate alone stops some that
    the paper's rule blocks (their scene's everyday caption beats the bare concept text), the
    in-context twins win them back, and scenes on other backgrounds stay passed as with the gate
    alone. (The zero-shot rule itself misses most characters on black: the floor here.)"""
    rng = np.random.default_rng(5)
    black = shapes.render_many([shapes.sample_scene(rng, background="black") for _ in range(48)],
                               rng)
    others = shapes.render_many([shapes.sample_scene(rng, background=str(b))
                                 for b in rng.choice(["brown", "gray", "white"], 96)], rng)
    rule, gate = black_filter(clip), black_filter(clip, everyday)
    both = black_filter(clip, everyday, in_context=twins["black_background"])
    missed = [1 - f.screen(black).blocked.mean() for f in (rule, gate, both)]
    assert missed[1] >= missed[0] + 0.08 and missed[2] <= missed[0] + 1 / 48, missed
    fired = [f.screen(others).blocked.mean() for f in (gate, both)]
    assert fired[1] <= fired[0] + 0.03, fired


def test_in_context_texts_are_refused_without_anchors_or_on_both_sides(clip, everyday):
    with pytest.raises(ValueError, match="in_context"):
        black_filter(clip, None, in_context=["a red star on a black background"])
    for bad in ("a red star", [], [1, 2], {"a red star": 1}, ["a red star", " "]):
        with pytest.raises(ValueError, match="in_context: give a non-empty list of texts"):
            black_filter(clip, everyday, in_context=bad)
        with pytest.raises(ValueError, match="everyday: give a non-empty list of texts"):
            black_filter(clip, bad)
    with pytest.raises(ValueError, match="equals an everyday text"):
        black_filter(clip, everyday, in_context=everyday[:2])


def test_checker_decisions_equal_the_anchored_single_filters(clip, everyday, twins,
                                                             backgrounds):
    filters = {c.name: EspressoFilter(*clip, c.unacceptable, c.acceptable, everyday=everyday,
                                      everyday_cut=0.4 + 0.03 * k,
                                      in_context=twins[c.name][:8 + 8 * k] if k % 3 else None)
               for k, c in enumerate(CONCEPTS)}  # some without twins, the others of 3 widths
    checker = ConceptChecker.from_filters(filters)
    images = np.concatenate(list(backgrounds.values()))
    result = checker.check(images)
    for k, filt in enumerate(filters.values()):
        single = filt.screen(images)
        assert np.array_equal(result.fired[:, k], single.blocked), filt.unacceptable
        assert np.allclose(result.p_vs_everyday[:, k], single.p_vs_everyday, atol=1e-5)


def test_an_anchored_checker_round_trips_and_a_changed_folder_is_refused(
        clip, everyday, twins, backgrounds, tmp_path):
    checker = ConceptChecker.from_clip(str(world.CLIP_DIR), {
        c.name: (c.unacceptable, c.acceptable) for c in CONCEPTS[:3]}, everyday=everyday,
        in_context={c.name: twins[c.name] for c in CONCEPTS[1:3]})
    assert checker.concepts[1].t_c is not None and checker.concepts[2].t_c is not None
    for bad, match in ((["Zorbo on a gray background"], "mapping"), ({"nobody": ["x"]}, "nobody")):
        with pytest.raises(ValueError, match=match):
            ConceptChecker.from_clip(str(world.CLIP_DIR), {"zorbo": ("Zorbo", "a star")},
                                     everyday=everyday, in_context=bad)
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
    assert torch.equal(loaded.concepts[1].t_c, checker.concepts[1].t_c)
    for change, match in ((lambda r: r.update(everyday_cut=1.0), r"everyday_cut"),
                          (lambda r: r.update(everyday_cut="0.5"), r"everyday_cut"),
                          (lambda r: r.update(in_context=r["in_context"] + 1), r"t_c\.1 has"),
                          (lambda r: r.update(in_context=None), r"t_c\.1"),
                          (lambda r: r.update(in_context=0), r"in_context")):
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


def test_a_version_3_checker_loads_with_the_gate_of_t_u_alone(tmp_path, clip, everyday, twins,
                                                              backgrounds):
    concepts = {"black_background": ("on a black background", "on a white background")}
    plain = ConceptChecker.from_clip(str(world.CLIP_DIR), concepts, everyday=everyday)
    ConceptChecker.from_clip(str(world.CLIP_DIR), concepts, everyday=everyday, in_context={
        "black_background": twins["black_background"]}).save_pretrained(tmp_path / "v3")
    config = json.loads((tmp_path / "v3" / "config.json").read_text())
    config["format_version"] = 3
    for row in config["concept_table"]:
        del row["in_context"]
    (tmp_path / "v3" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailableError, match=r"t_c\.0"):  # vectors it does not expect
        ConceptChecker.from_pretrained(tmp_path / "v3", device="cpu")
    plain.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["format_version"] = 3
    for row in config["concept_table"]:
        del row["in_context"]
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    loaded = ConceptChecker.from_pretrained(tmp_path / "plain", device="cpu")
    images = np.concatenate(list(backgrounds.values()))
    assert loaded.concepts[0].t_c is None
    assert np.array_equal(loaded.check(images).p_vs_everyday, plain.check(images).p_vs_everyday)


def planted(rng, n_groups, per_group):
    """Everyday scores of one anchored concept whose c_u-vs-c_a rule fires on every image:
    gate scores in (0, 1), a group's images sharing a group effect (the clustering)."""
    effect = rng.uniform(size=(n_groups, 1))
    gate = 0.5 * effect + 0.5 * rng.uniform(size=(n_groups, per_group))
    return gate.ravel(), np.repeat(np.arange(n_groups), per_group)


def cuts_of(gate, groups, target, fires=None, unscored=None):
    n = len(gate)
    return conformal_everyday_cuts(np.ones((n, 1), bool) if fires is None else fires,
                                   gate[:, None] if gate.ndim == 1 else gate,
                                   np.zeros(n, bool) if unscored is None else unscored,
                                   groups, [0], target, ["c"])


def test_conformal_cuts_have_the_known_rank_and_split():
    rng = np.random.default_rng(0)
    gate, groups = planted(rng, 198, 3)
    lam, cuts, split = cuts_of(gate, groups, 0.01)
    assert split == {"reference_groups": 99, "calibration_groups": 99}
    # known answer: the scale is the reference half's scores (continued in logits above their
    # top); lambda is the calibration half's largest group score (rank ceil(100 * 0.99) = 99
    # of 99); the cut passes exactly what the scale says
    reference_units = set(np.random.default_rng(0).permutation(np.arange(198))[:99].tolist())
    reference = np.isin(groups, list(reference_units))
    scale = np.sort(gate[reference])
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    shares = (np.searchsorted(scale, gate, side="right") / len(scale)
              + np.maximum(0, logit(gate) - logit(scale[-1])))
    assert lam == pytest.approx(max(shares[(groups == g)].max() for g in range(198)
                                    if g not in reference_units))
    if lam < 1:
        assert (scale > cuts[0]).mean() == pytest.approx(1 - np.floor(lam * 297) / 297)
    else:
        assert logit(cuts[0]) == pytest.approx(logit(scale[-1]) + lam - 1)
    assert not (gate[~reference] > cuts[0]).reshape(-1, 3).any(1).any()  # the largest, passed
    with pytest.raises(ValueError, match="at least 198 groups"):
        cuts_of(gate, groups % 100, 0.01)


def test_conformal_cuts_cover_fresh_groups():
    # over many calibrations, a fresh group is blocked at most target of the time (and not far
    # below it: the guarantee is tight to 1/(n+1))
    rng = np.random.default_rng(1)
    fresh_blocked = []
    for _ in range(300):
        gate, groups = planted(rng, 120, 3)
        lam, cuts, _ = cuts_of(gate, groups, 0.1)
        new, new_groups = planted(rng, 200, 3)
        fresh_blocked.append(np.mean([(new[new_groups == g] > cuts[0]).any()
                                      for g in range(200)]))
    assert 0.1 - 1 / 61 - 0.01 <= np.mean(fresh_blocked) <= 0.1 + 0.01


def test_a_concept_that_seldom_fires_keeps_its_gate_open():
    # two concepts: one fires on every everyday image, one on none but a few; the second's cut
    # stays at the bottom of its scale (its c_u images keep passing), the first is held back
    rng = np.random.default_rng(2)
    gate, groups = planted(rng, 200, 2)
    fires = np.ones((len(gate), 2), bool)
    fires[:, 1] = rng.uniform(size=len(gate)) < 0.005
    lam, cuts, _ = conformal_everyday_cuts(fires, np.c_[gate, gate], np.zeros(len(gate), bool),
                                           groups, [0, 1], 0.05, ["often", "seldom"])
    assert cuts[0] > 0.5 and cuts[1] < 0.5


def test_an_unscored_everyday_image_cannot_be_calibrated_away():
    gate, groups = np.full(100, 0.2), np.arange(100)
    unscored = np.zeros(100, bool)
    unscored[::10] = True
    with pytest.raises(ValueError, match="blocked whatever the everyday cuts"):
        cuts_of(gate, groups, 0.05, unscored=unscored)


def test_calibrate_everyday_reaches_its_target_on_the_mini_world(clip, everyday, backgrounds):
    checker = ConceptChecker.from_filters({"black_background": black_filter(clip, everyday)})
    negatives = np.concatenate([backgrounds[b] for b in ("brown", "gray", "white")])
    before = checker.check(negatives).blocked.mean()
    record = checker.calibrate_everyday(negatives, 0.05, positives={
        "black_background": backgrounds["black"]})
    after = checker.check(negatives).blocked.mean()
    assert record["groups"] == 72 and record["calibration_groups"] == 36
    assert record["blocked_images"] == pytest.approx(after)
    assert after < 0.05 < before   # on the images it was calibrated on
    calibration = checker.concepts[0].everyday["calibration"]
    black = checker.check(backgrounds["black"])
    assert calibration["validation_unacceptable_gated"] == pytest.approx(
        (black.p_vs_everyday[:, 0] <= checker.everyday_cuts[0]).mean())
