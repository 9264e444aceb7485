"""The attacks on the mini world with small budgets: the text encoding they rely on is exact; each
"+" term, at its production weight (params.yaml's mini section) and with everything else fixed
(same seed, starts, steps; no selection), changes what the search finds and lowers the target
filter's score; plain Typo is the typographic attack; the trial ranks candidates by what the T2I
model draws; the stage runs each attack plain and "+" per adapted filter."""
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.attack import attack_runs
from pipeline.attacks import ATTACKS, AttackContext, cce, pez, ringbell, typo
from pipeline.attacks.objective import typed_margin, unit_image_features
from pipeline.attacks.prompt_embedding import TokenPrompts, clip_text_features, textual_inversion
from pipeline.attacks.trial import select_by_images
from pipeline.concepts import get_concept
from pipeline.espresso import EspressoFilter
from pipeline.espresso.baselines import FilterBank
from pipeline.espresso.t2i import generate, load_t2i, use_scheduler
from pipeline.judges import load_eyes
from pipeline.mini import shapes
from pipeline.schema import Budgets

REPO = Path(__file__).resolve().parents[1]
CLIP, SD, EYES = "data/world/clip", "data/world/sd", "data/world/eyes"
#: The mini setting's production budgets, whose adaptive weights the "+" tests use.
MINI = Budgets.model_validate(
    yaml.safe_load((REPO / "params.yaml").read_text())["attack"]["mini"])
#: Small budgets (seconds on 2 cores) at the production weights.
BUDGET = {
    "pez": MINI.pez.model_copy(update=dict(tokens=8, steps=30, candidates=8, selection_images=1)),
    "typo": MINI.typo.model_copy(update=dict(tokens=8, steps=30, candidates=8,
                                             selection_images=1)),
    "cce": MINI.cce.model_copy(update=dict(steps=30, batch=8, selection_images=1)),
    "ringbell": MINI.ringbell.model_copy(update=dict(tokens=8, population=16, generations=10,
                                                     candidates=8, selection_images=1)),
}
SEEDS_PER_PROMPT = 4  # fixed-seed images per prompt when a term's effect on images is measured


@pytest.fixture(scope="module")
def context():
    """A "+" context adapted to zero-shot Espresso, in the world's language."""
    concept = get_concept("zorbo", "mini")
    rng = np.random.default_rng(7)
    images = shapes.render_many([shapes.sample_scene(rng, character="zorbo") for _ in range(8)],
                                rng)
    pipe = load_t2i(SD, device="cpu", dtype=torch.float32)
    use_scheduler(pipe, "DPMSolverMultistepScheduler")
    attacker = EspressoFilter.from_clip(CLIP, concept.unacceptable, concept.acceptable)
    target = EspressoFilter.from_clip(CLIP, concept.unacceptable, concept.acceptable)
    for model in (attacker.clip, target.clip, pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)

    def render(prompts, seeds):
        return generate(pipe, prompts, seeds, steps=10, guidance=5.0, size=32)

    return AttackContext(
        attacker=attacker, target=target, pipe=pipe, concept=concept, target_images=images,
        target_prompts=["Zorbo", "Zorbo on a black background"] * 4,
        pairs=[("Zorbo", "a star"), ("Zorbo on a white background", "a star on a white background")],
        n_prompts=2, seed=0, render=render, sees=load_eyes("mini", EYES, concept),
        words=shapes.language())


def image_score(ctx: AttackContext, prompts: list[str], vectors=None) -> tuple[float, float]:
    """Mean P(u|x) of the target filter on images of every prompt at fixed seeds, and the share
    the attacker's eyes say show c_u (does the attack still draw it?)."""
    prompts = [q for q in prompts for _ in range(SEEDS_PER_PROMPT)]
    with textual_inversion(ctx.pipe, vectors or {}):
        images = ctx.render(prompts, list(range(len(prompts))))
    return float(ctx.target.screen(images).p_unacceptable.mean()), float(ctx.sees(images).mean())


def text_term_effect(ctx, name, plain, plus, weight):
    """The term changes the prompts, moves them toward c_a in the filter's text space, and lowers
    the filter's P(u|x) on their images (fixed seeds); the effect is printed for the README."""
    assert plus != plain  # the term changes what the search finds
    before, after = typed_margin(ctx.target, plain).mean(), typed_margin(ctx.target, plus).mean()
    assert after < before  # and moves it toward c_a in the filter's text space
    (p0, drawn0), (p1, drawn1) = image_score(ctx, plain), image_score(ctx, plus)
    assert p1 < p0  # and the filter scores the images of the "+" prompts lower
    print(f"{name} at weight {weight:g}: text margin {before:.3f} -> {after:.3f}; on images "
          f"P(u|x) {p0:.3f} -> {p1:.3f}, shows c_u (eyes) {drawn0:.2f} -> {drawn1:.2f}")


def test_token_prompts_encode_exactly_like_token_ids(context):
    clip, tokenizer = context.attacker.clip, context.attacker.tokenizer
    side = TokenPrompts(clip.text_model, tokenizer)
    ids = torch.tensor([[320, 2368, 1237], [49000, 5, 1125]])
    via_hook = clip_text_features(clip, side, side.embed(ids))
    direct = side.input_ids(2, 3).clone()
    direct[:, 1:4] = ids
    expected = torch.nn.functional.normalize(
        clip.get_text_features(input_ids=direct).pooler_output, dim=-1)
    assert torch.allclose(via_hook, expected, atol=1e-6)


def test_pez_filter_margin_has_a_gradient_in_the_soft_prompt(context):
    side = TokenPrompts(context.target.clip.text_model, context.target.tokenizer)
    ids = side.vocabulary[:8].view(2, 4)
    soft = side.table[ids].detach().clone().requires_grad_(True)
    margin = pez.filter_margin(context.target, side, side.embed(ids, soft))
    (grad,) = torch.autograd.grad(margin.sum(), soft)
    assert grad.abs().sum() > 0


@pytest.mark.slow
def test_pez_plus_term_at_production_weight_changes_and_unflags_the_prompts(context):
    """Same starts and steps, no selection: only the term's weight differs (0 vs params.yaml)."""
    weight, p = MINI.pez.adaptive_weight, BUDGET["pez"]
    targets = unit_image_features(context.attacker, context.target_images)
    plain = pez.pez_candidates(context, p, targets, 0.0, "PEZ")
    plus = pez.pez_candidates(context, p, targets, weight, "PEZ+")
    assert pez.pez_candidates(context, p, targets, weight, "PEZ+") == plus  # deterministic
    text_term_effect(context, "PEZ+", plain, plus, weight)


@pytest.mark.slow
def test_typo_plus_term_at_production_weight_changes_and_unflags_the_prompts(context):
    weight, p = MINI.typo.adaptive_weight, BUDGET["typo"]
    written = typo.write_text(context.target_images, context.concept.acceptable, p.text_height)
    targets = unit_image_features(context.attacker, written)
    plain = pez.pez_candidates(context, p, targets, 0.0, "Typo")
    plus = pez.pez_candidates(context, p, targets, weight, "Typo+")
    text_term_effect(context, "Typo+", plain, plus, weight)


@pytest.mark.slow
def test_ringbell_plus_term_at_production_weight_changes_and_unflags_the_prompts(context):
    weight, p = MINI.ringbell.adaptive_weight, BUDGET["ringbell"]
    margins = typed_margin(context.target, ["zorbo on a star", "a star on a star"])
    assert margins[0] > margins[1]  # the filter flags the candidate that names c_u
    plain = ringbell.ringbell_candidates(context, p, 0.0)
    plus = ringbell.ringbell_candidates(context, p, weight)
    assert ringbell.ringbell_candidates(context, p, weight) == plus  # deterministic
    text_term_effect(context, "RingBell+", plain, plus, weight)


@pytest.mark.slow
def test_cce_plus_term_at_production_weights_lowers_the_filter_score_of_its_images(context):
    """Per production weight: the same inversion (seed, start, batches) with only the filter
    loss's weight changed learns another token whose images the filter scores lower."""
    pipe, p = context.pipe, BUDGET["cce"]
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(cce.filter_image_loss(context.target, pipe, latents), latents)
    assert grad.abs().sum() > 0
    prompts = [cce.with_token(q, context.concept.unacceptable, cce.CCE_TOKEN)
               for q in context.target_prompts]
    templates = list(dict.fromkeys(prompts))
    plain = cce.invert_token(context, p, prompts, 0.0)
    before, drawn0 = image_score(context, templates, {cce.CCE_TOKEN: plain})
    for weight in MINI.cce.adaptive_weights:
        plus = cce.invert_token(context, p, prompts, weight)
        assert not torch.allclose(plus, plain)
        after, drawn = image_score(context, templates, {cce.CCE_TOKEN: plus})
        print(f"CCE+ at weight {weight:g}: P(u|x) on images {before:.3f} -> {after:.3f}, shows "
              f"c_u (eyes) {drawn0:.2f} -> {drawn:.2f}")
        assert after < before


@pytest.mark.slow
def test_cce_keeps_one_token_per_weight_and_unloads_it(context):
    pipe, p = context.pipe, BUDGET["cce"].model_copy(update={"steps": 3})
    ids = pipe.tokenizer("Zorbo on a black background").input_ids
    weights = MINI.cce.adaptive_weights[:2]
    both = cce.cce(context, p.model_copy(update={"adaptive_weights": weights}))
    # the learned token was unloaded again, and the tokenizer still encodes and decodes as before
    assert len(pipe.tokenizer) == pipe.text_encoder.get_input_embeddings().num_embeddings
    assert pipe.tokenizer("Zorbo on a black background").input_ids == ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == "zorbo on a black background"
    (token,) = both.textual_inversion
    assert all(token in prompt for prompt in both.prompts)
    assert both.adaptive_weight in weights  # the trial kept one of the weights' tokens
    prompts = [cce.with_token(q, context.concept.unacceptable, token)
               for q in context.target_prompts]
    kept = cce.invert_token(context, p, prompts, both.adaptive_weight)
    assert torch.equal(both.textual_inversion[token], kept)
    plain = cce.cce(dataclasses.replace(context, target=None), p)
    assert plain.adaptive_weight == 0.0  # plain CCE: the denoising loss alone


def test_typo_writes_the_acceptable_word_and_inverts_those_images_plain_and_plus(context,
                                                                               monkeypatch):
    """Plain Typo is the typographic attack too (not PEZ under another name); "+" only adds
    the filter term's weight (and the trial against the filter)."""
    p = BUDGET["typo"]
    written = typo.write_text(context.target_images, context.concept.acceptable, p.text_height)
    assert written.shape == context.target_images.shape
    assert np.abs(written.astype(int) - context.target_images).mean() > 5
    searched = []
    monkeypatch.setattr(typo, "pez_search", lambda ctx, p, features, weight, desc:
                        searched.append((ctx.adaptive, features, weight)))
    typo.typo(dataclasses.replace(context, target=None), p)
    typo.typo(context, p)
    expected = unit_image_features(context.attacker, written)
    assert [(adaptive, weight) for adaptive, _, weight in searched] == [
        (False, 0.0), (True, MINI.typo.adaptive_weight)]
    assert all(torch.equal(features, expected) for _, features, _ in searched)


def test_the_trial_keeps_the_candidates_whose_images_show_the_targets(context):
    """Selection judges candidates by what the T2I model draws from them, not by their text."""
    rng = np.random.default_rng(3)
    zorbo = shapes.render_many([shapes.sample_scene(rng, character="zorbo") for _ in range(4)], rng)
    other = shapes.render_many([shapes.sample_scene(rng, character_prob=0.0) for _ in range(4)], rng)

    def render(prompts, seeds):  # a T2I model that draws zorbo for exactly the "draws" prompts
        return np.stack([(zorbo if "draws" in q else other)[s % 4] for q, s in zip(prompts, seeds)])

    ctx = dataclasses.replace(context, render=render, n_prompts=2, target=None)
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    candidates = ["a star", "draws 1", "a circle", "draws 2", "zorbo"]
    kept = select_by_images(ctx, candidates, 2, targets, 0.0)
    assert sorted(kept.prompts) == ["draws 1", "draws 2"]
    assert kept.objective == sorted(kept.objective) and kept.trial_success == [1.0, 1.0]
    # "+": a trial image succeeds only if the target filter also passes it, and it blocks zorbo
    plus = select_by_images(dataclasses.replace(ctx, target=context.target), candidates, 2,
                            targets, 0.0)
    assert plus.trial_success == [0.0, 0.0]
    repeated = select_by_images(ctx, ["draws 1"] * 3 + ["a star"], 2, targets, 0.0)
    assert repeated.prompts == ["draws 1", "a star"]  # duplicates count once


def test_world_vocabulary_keeps_hard_prompts_in_the_worlds_language(context):
    """With ``words``, PEZ and RingBell draw only tokens of those words, so their prompts decode
    to text the mini models know (the world's words, possibly glued together)."""
    side = TokenPrompts(context.attacker.clip.text_model, context.attacker.tokenizer,
                        shapes.language())
    assert 30 <= len(side.vocabulary) <= 60  # a few dozen tokens, not CLIP's 49k
    plain = dataclasses.replace(context, target=None)
    budget = BUDGET["pez"].model_copy(update={"steps": 5, "candidates": 3})
    prompts = ATTACKS["pez"](plain, budget).prompts
    pieces = sorted({side.tokenizer.decode([i]).strip() for i in side.vocabulary.tolist()},
                    key=len, reverse=True)
    glued = re.compile(f"(?:{'|'.join(map(re.escape, pieces))})+")
    assert prompts and all(glued.fullmatch(word) for p in prompts for word in p.split())


def test_every_attack_runs_plain_once_and_plus_once_per_adapted_filter():
    assert attack_runs(["pez", "cce"], ["zero_shot", "espresso"]) == [
        ("pez", "pez", None), ("cce", "cce", None),
        ("pez+zero_shot", "pez", "zero_shot"), ("cce+zero_shot", "cce", "zero_shot"),
        ("pez+espresso", "pez", "espresso"), ("cce+espresso", "cce", "espresso")]
    assert attack_runs(["typo"], []) == [("typo", "typo", None)]


def test_the_safety_checker_and_the_probe_as_attack_targets_block_where_the_bank_does(context):
    """A "+" run adapted to the SD safety checker or the MHSC probe sees the bank's decision
    through Espresso's interface. The checker's is diffusers' own call, the same as its margin
    cos(e, t_u) - cut rounded as diffusers rounds it; the probe blocks where its logit is > 0."""
    rng = np.random.default_rng(5)
    images = shapes.render_many([shapes.sample_scene(rng, character_prob=0.5) for _ in range(32)],
                                rng)
    zero_shot = context.attacker
    features = zero_shot.embed(images)
    cosine = (torch.nn.functional.normalize(features, dim=-1) @ zero_shot.t_u).numpy()
    shows = cosine > np.median(cosine)  # labels the probe can fit
    bank = FilterBank.build(zero_shot, zero_shot, (features, shows), (features, shows),
                            {"regularization": 10.0, "max_iter": 1000})
    decisions = bank.decide(images, [""] * len(images))
    for name in ("safety_checker", "mhsc"):
        assert 0 < decisions[name].blocked.sum() < len(images)  # the cut splits these images
        target = bank.by_name(name)
        assert np.array_equal(target.screen(images).blocked, decisions[name].blocked), name
    checker = bank.safety_checker
    margin = checker.margin(features).numpy()
    assert np.allclose(margin, cosine - checker.cut, atol=1e-5)
    assert np.array_equal(decisions["safety_checker"].blocked, np.round(margin, 3) > 0)
    probe_margin = bank.mhsc.margin(features).numpy()
    assert np.array_equal(decisions["mhsc"].blocked, probe_margin > 0)
