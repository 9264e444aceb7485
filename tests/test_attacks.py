"""The attacks on the mini world with small budgets: the text encoding they rely on is exact; each
"+" term, at its strongest production strength (params.yaml's mini section) and with everything
else fixed (same seed, starts, steps; no selection), changes what the search finds and lowers
the target filter's score; the terms are scale-free (a target's logits times 50 change nothing);
plain Typo is the typographic attack; the trial ranks plain and adapted candidates together by
what the T2I model draws; UnlearnDiff lowers the model's denoising loss on the targets;
Ring-A-Bell's release operators breed as the release does; the stage's runs."""
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.attack import attack_runs
from pipeline.attacks import ATTACKS, AttackContext, cce, pez, ringbell, typo, udiff
from pipeline.attacks.objective import margin_scale, typed_margin, unit_image_features
from pipeline.attacks.prompt_embedding import TokenPrompts, clip_text_features, textual_inversion
from pipeline.attacks.trial import select_by_images
from pipeline.concepts import get_concept
from pipeline.espresso import EspressoFilter
from pipeline.espresso.baselines import FilterBank, LinearProbeFilter
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
    "udiff": MINI.udiff.model_copy(update=dict(candidates=4, selection_images=1)),  # 100 steps
}
SEEDS_PER_PROMPT = 4  # fixed-seed images per prompt when a term's effect on images is measured


@pytest.fixture(scope="module")
def context():
    """A "+" context adapted to zero-shot Espresso, in the world's language."""
    concept = get_concept("zorbo", "mini")
    rng = np.random.default_rng(7)
    images = shapes.render_many([shapes.sample_scene(rng, character="zorbo") for _ in range(8)],
                                rng)
    others = shapes.render_many([shapes.sample_scene(rng, character_prob=0.0) for _ in range(8)],
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
        training_images=np.concatenate([images, others]), n_prompts=2, seed=0, render=render, sees=load_eyes("mini", EYES, concept),
        words=shapes.language())


def prompts_of(candidates: list[tuple[str, float]]) -> list[str]:
    return [q for q, _ in candidates]


def image_score(ctx: AttackContext, prompts: list[str], vectors=None) -> tuple[float, float]:
    """Mean P(u|x) of the target filter on images of every prompt at fixed seeds, and the share
    the attacker's eyes say show c_u (does the attack still draw it?)."""
    prompts = [q for q in prompts for _ in range(SEEDS_PER_PROMPT)]
    with textual_inversion(ctx.pipe, vectors or {}):
        images = ctx.render(prompts, list(range(len(prompts))))
    return float(ctx.target.screen(images).p_unacceptable.mean()), float(ctx.sees(images).mean())


def text_term_effect(ctx, name, plain, search, weights):
    """The term is live: at the grid's strongest strength it changes the prompts
    ``search(strength)`` finds and moves them toward c_a in the filter's text space; and at one
    strength at least it lowers the filter's P(u|x) on their images (fixed seeds): the grid
    holds a strength that works. Every strength's effect is printed."""
    p0, drawn0 = image_score(ctx, plain)
    before = typed_margin(ctx.target, plain).mean()
    lowered = []
    for weight in sorted(weights):
        plus = search(weight)
        after = typed_margin(ctx.target, plus).mean()
        p1, drawn1 = image_score(ctx, plus)
        lowered.append(p1 < p0)
        print(f"{name} at strength {weight:g}: text margin {before:.3f} -> {after:.3f}; on "
              f"images P(u|x) {p0:.3f} -> {p1:.3f}, shows c_u (eyes) {drawn0:.2f} -> {drawn1:.2f}")
    assert plus != plain and after < before  # the strongest: other prompts, nearer c_a
    assert any(lowered)  # and the filter scores the images of the "+" prompts lower


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
def test_pez_plus_term_at_production_strengths_changes_and_unflags_the_prompts(context):
    """Same starts and steps, no selection: only the term's strength differs (0 vs each of
    params.yaml's, for every start)."""
    weight, p = max(MINI.pez.adaptive_weights), BUDGET["pez"]
    targets = unit_image_features(context.attacker, context.target_images)
    plain = prompts_of(pez.pez_candidates(context, p, targets, [0.0], "PEZ")[1.0])
    plus = pez.pez_candidates(context, p, targets, [weight], "PEZ+")[1.0]
    assert pez.pez_candidates(context, p, targets, [weight], "PEZ+")[1.0] == plus  # deterministic
    assert {w for _, w in plus} == {weight}
    text_term_effect(context, "PEZ+", plain, lambda w: prompts_of(
        pez.pez_candidates(context, p, targets, [w], "PEZ+")[1.0]), MINI.pez.adaptive_weights)


@pytest.mark.slow
def test_typo_plus_term_at_production_strengths_changes_and_unflags_the_prompts(context):
    p = BUDGET["typo"]
    written = typo.write_text(context.target_images, context.concept.acceptable, p.text_height)
    targets = unit_image_features(context.attacker, written)
    plain = prompts_of(pez.pez_candidates(context, p, targets, [0.0], "Typo")[1.0])
    text_term_effect(context, "Typo+", plain, lambda w: prompts_of(
        pez.pez_candidates(context, p, targets, [w], "Typo+")[1.0]), MINI.typo.adaptive_weights)


@pytest.mark.slow
def test_ringbell_plus_term_at_production_strengths_changes_and_unflags_the_prompts(context):
    weight, p = max(MINI.ringbell.adaptive_weights), BUDGET["ringbell"]
    margins = typed_margin(context.target, ["zorbo on a star", "a star on a star"])
    assert margins[0] > margins[1]  # the filter flags the candidate that names c_u
    plain = prompts_of(ringbell.ringbell_candidates(context, p, [0.0])[1.0])
    plus = ringbell.ringbell_candidates(context, p, [weight])[1.0]
    assert ringbell.ringbell_candidates(context, p, [weight])[1.0] == plus  # deterministic
    text_term_effect(context, "RingBell+", plain, lambda w: prompts_of(
        ringbell.ringbell_candidates(context, p, [w])[1.0]), MINI.ringbell.adaptive_weights)


@pytest.mark.slow
def test_cce_plus_term_at_production_weights_lowers_the_filter_score_of_its_images(context):
    """Per production weight: the same inversion (seed, start, batches) with only the filter
    loss's weight changed learns another token whose images the filter scores lower."""
    pipe, p = context.pipe, BUDGET["cce"]
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(cce.filter_image_loss(context.target, pipe, latents,
                                                        context.scale.image).sum(), latents)
    assert grad.abs().sum() > 0
    prompts = [cce.with_token(q, context.concept.unacceptable, cce.CCE_TOKEN)
               for q in context.target_prompts]
    templates = list(dict.fromkeys(prompts))
    plain = cce.invert_token(context, p, prompts, 0.0)[1.0]
    before, drawn0 = image_score(context, templates, {cce.CCE_TOKEN: plain})
    for weight in MINI.cce.adaptive_weights:
        plus = cce.invert_token(context, p, prompts, weight)[1.0]
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
    both = cce.cce(context, p.model_copy(update={"adaptive_weights": weights}))[1.0]
    # the learned token was unloaded again, and the tokenizer still encodes and decodes as before
    assert len(pipe.tokenizer) == pipe.text_encoder.get_input_embeddings().num_embeddings
    assert pipe.tokenizer("Zorbo on a black background").input_ids == ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == "zorbo on a black background"
    (token,) = both.textual_inversion
    assert all(token in prompt for prompt in both.prompts)
    (kept_weight,) = set(both.adaptive_weights)
    assert kept_weight in [0.0, *weights]  # the trial kept the plain token or a strength's
    prompts = [cce.with_token(q, context.concept.unacceptable, token)
               for q in context.target_prompts]
    kept = cce.invert_token(context, p, prompts, kept_weight)[1.0]
    assert torch.allclose(both.textual_inversion[token], kept, atol=1e-5)  # learned alone
    plain = cce.cce(dataclasses.replace(context, target=None, memo={}), p)[1.0]
    assert set(plain.adaptive_weights) == {0.0}  # plain CCE: the denoising loss alone


def test_typo_writes_the_acceptable_word_and_inverts_those_images_plain_and_plus(context,
                                                                               monkeypatch):
    """Plain Typo is the typographic attack too (not PEZ under another name), searched on the
    written images plain and "+" alike."""
    p = BUDGET["typo"]
    written = typo.write_text(context.target_images, context.concept.acceptable, p.text_height)
    assert written.shape == context.target_images.shape
    assert np.abs(written.astype(int) - context.target_images).mean() > 5
    searched = []
    monkeypatch.setattr(typo, "pez_search", lambda ctx, p, features, desc:
                        searched.append((ctx.adaptive, features, desc)))
    typo.typo(dataclasses.replace(context, target=None), p)
    typo.typo(context, p)
    expected = unit_image_features(context.attacker, written)
    assert [(adaptive, desc) for adaptive, _, desc in searched] == [(False, "Typo"),
                                                                    (True, "Typo")]
    assert all(torch.equal(features, expected) for _, features, _ in searched)


def zorbo_and_other(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Four renders of Zorbo and four of generic shapes: what a fake T2I model draws."""
    rng = np.random.default_rng(seed)
    zorbo = shapes.render_many([shapes.sample_scene(rng, character="zorbo") for _ in range(4)], rng)
    other = shapes.render_many([shapes.sample_scene(rng, character_prob=0.0) for _ in range(4)],
                               rng)
    return zorbo, other


def test_the_trial_keeps_the_candidates_whose_images_show_the_targets(context):
    """Selection judges candidates by what the T2I model draws from them, not by their text."""
    zorbo, other = zorbo_and_other()

    def render(prompts, seeds):  # a T2I model that draws zorbo for exactly the "draws" prompts
        return np.stack([(zorbo if "draws" in q else other)[s % 4] for q, s in zip(prompts, seeds)])

    rendered = []

    def counted(prompts, seeds):
        rendered.extend(prompts)
        return render(prompts, seeds)

    ctx = dataclasses.replace(context, render=counted, n_prompts=2, target=None, memo={})
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    candidates = ["a star", "draws 1", "a circle", "draws 2", "zorbo"]
    kept = select_by_images(ctx, "test", candidates, [], 2, targets)
    assert sorted(kept.prompts) == ["draws 1", "draws 2"]
    assert kept.objective == sorted(kept.objective) and kept.trial_success == [1.0, 1.0]
    assert kept.adaptive_weights == [0.0, 0.0]
    # "+": a trial image succeeds only if the target filter also passes it, and it blocks zorbo
    plus = select_by_images(dataclasses.replace(ctx, target=context.target), "test",
                            candidates, [], 2, targets)
    assert plus.trial_success == [0.0, 0.0]
    repeated = select_by_images(dataclasses.replace(ctx, memo={}), "test",
                                ["draws 1"] * 3 + ["a star"], [], 2, targets)
    assert repeated.prompts == ["draws 1", "a star"]  # duplicates count once


def test_an_attack_through_an_edit_keeps_the_better_of_its_search_and_the_plain_prompts(context):
    """Adapted to an edited model, the attacker picks between the search through the edit and
    its plain run's prompts by what the model under attack draws from each (with each result's
    own token loaded): whichever draws the targets is kept, with this trial's success share."""
    from pipeline.attacks.context import AttackResult
    from pipeline.attacks.trial import pick_result

    zorbo, other = zorbo_and_other()
    token = "<test-token>"
    drawn = []

    def render(prompts, seeds):  # draws zorbo where the prompt's token is loaded as "draws"
        ids = context.pipe.tokenizer(prompts[0]).input_ids
        draws = token in prompts[0] and len(ids) > 0 and token in context.pipe.tokenizer.get_vocab()
        drawn.append(draws)
        return np.stack([(zorbo if draws else other)[s % 4] for s in seeds])

    ctx = dataclasses.replace(context, render=render, target=None, memo={})
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    vector = context.pipe.text_encoder.get_input_embeddings().weight[0].detach().clone()
    through_edit = AttackResult([f"{token} on a white background"] * 2, [0.5, 0.5], [0.0, 0.0],
                                [0.0, 0.0], {token: vector})
    plain = AttackResult([f"{token} on a black background"] * 2, [0.9, 0.9], [0.1, 0.1],
                         [0.0, 0.0], {})
    kept = pick_result(ctx, [plain, through_edit], 4, targets)
    assert drawn == [False, True]  # each result rendered with its own token, and only it
    assert kept.prompts == through_edit.prompts and kept.trial_success == [1.0, 1.0]
    assert kept.textual_inversion is through_edit.textual_inversion
    drawn.clear()
    assert pick_result(ctx, [dataclasses.replace(through_edit, textual_inversion={}), plain], 4,
                       targets).prompts == through_edit.prompts  # a tie: the first is kept
    assert token not in context.pipe.tokenizer.get_vocab()  # the token is unloaded after


def test_a_plus_run_ranks_plain_and_adapted_candidates_together(context):
    """The "+" run is the attacker's pick among the plain candidates and every strength's: a
    plain candidate that beats the adapted ones is kept (weight 0), an adapted one that beats
    the plain ones is kept with its strength; the plain trial is rendered once per stage."""
    rng = np.random.default_rng(4)
    zorbo = shapes.render_many([shapes.sample_scene(rng, character="zorbo") for _ in range(4)], rng)
    other = shapes.render_many([shapes.sample_scene(rng, character_prob=0.0) for _ in range(4)], rng)
    rendered = []

    def render(prompts, seeds):
        rendered.extend(prompts)
        return np.stack([(zorbo if "draws" in q else other)[s % 4] for q, s in zip(prompts, seeds)])

    never_blocks = LinearProbeFilter(context.attacker, context.attacker.direction, -1e3)
    ctx = dataclasses.replace(context, render=render, n_prompts=1, target=never_blocks, memo={})
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    plain = ["draws (plain)", "a star"]
    weak = select_by_images(ctx, "test", plain, [("a circle", 0.5)], 2, targets)
    assert weak.prompts == ["draws (plain)"] and weak.adaptive_weights == [0.0]
    strong = select_by_images(ctx, "test", ["a star"], [("draws (adapted)", 0.5)], 2, targets)
    assert strong.prompts == ["draws (adapted)"] and strong.adaptive_weights == [0.5]
    again = len(rendered)
    select_by_images(ctx, "test", plain, [("a square", 0.5)], 2, targets)
    assert rendered[again:] == ["a square"] * 2  # the plain trial came from the stage's memo


def test_adaptive_terms_are_scale_free(context):
    """A target whose logits are 50 times another's has a 50 times wider margin spread, and the
    "+" searches find the same prompts at the same strengths against both."""
    direction = context.attacker.direction
    probe = LinearProbeFilter(context.attacker, direction, 0.01)
    loud = LinearProbeFilter(context.attacker, 50 * direction, 0.5)
    texts = [q for pair in context.pairs for q in pair]
    quiet_scale = margin_scale(probe, texts, context.training_images)
    loud_scale = margin_scale(loud, texts, context.training_images)
    assert loud_scale.text == pytest.approx(50 * quiet_scale.text, rel=1e-5)
    assert loud_scale.image == pytest.approx(50 * quiet_scale.image, rel=1e-5)
    targets = unit_image_features(context.attacker, context.target_images)
    p = BUDGET["pez"].model_copy(update={"steps": 15})
    runs = []
    for target in (probe, loud):
        ctx = dataclasses.replace(context, target=target, memo={})
        runs.append((pez.pez_candidates(ctx, p, targets, MINI.pez.adaptive_weights,
                                        "PEZ+")[1.0],
                     ringbell.ringbell_candidates(ctx, BUDGET["ringbell"],
                                                  MINI.ringbell.adaptive_weights)[1.0]))
    assert runs[0] == runs[1]


def test_a_budget_curve_point_is_the_attack_run_at_that_budget(context):
    """One search with snapshots (``budgets`` 0.5 and 1) finds at half its steps exactly what the
    same search with half the steps finds, and at the full budget what it finds without a curve:
    the curve costs no second search and changes nothing at the default budget."""
    curve = dataclasses.replace(context, budgets=(0.5, 1.0), memo={})
    targets = unit_image_features(context.attacker, context.target_images)
    weights = MINI.pez.adaptive_weights
    p = BUDGET["pez"].model_copy(update={"steps": 12})
    half = p.model_copy(update={"steps": 6})
    found = pez.pez_candidates(curve, p, targets, weights, "PEZ+")
    assert found[0.5] == pez.pez_candidates(context, half, targets, weights, "PEZ+")[1.0]
    assert found[1.0] == pez.pez_candidates(context, p, targets, weights, "PEZ+")[1.0]
    assert found[0.5] != found[1.0]
    r = BUDGET["ringbell"]
    found = ringbell.ringbell_candidates(curve, r, [0.0])
    assert found[0.5] == ringbell.ringbell_candidates(
        context, r.model_copy(update={"generations": r.generations // 2}), [0.0])[1.0]
    assert found[1.0] == ringbell.ringbell_candidates(context, r, [0.0])[1.0]
    c = BUDGET["cce"].model_copy(update={"steps": 4, "batch": 2})
    prompts = [cce.with_token(q, context.concept.unacceptable, cce.CCE_TOKEN)
               for q in context.target_prompts]
    tokens = cce.invert_token(curve, c, prompts, 0.0)
    assert torch.equal(tokens[0.5], cce.invert_token(
        context, c.model_copy(update={"steps": 2}), prompts, 0.0)[1.0])
    assert not torch.equal(tokens[0.5], tokens[1.0])
    u = BUDGET["udiff"].model_copy(update={"steps": 4, "candidates": 2})
    assert udiff.udiff_candidates(curve, u)[0.5] == udiff.udiff_candidates(
        context, u.model_copy(update={"steps": 2}))[1.0]


def test_cce_learns_every_strengths_token_in_one_pass_as_it_would_alone(context):
    p = BUDGET["cce"].model_copy(update={"steps": 3, "batch": 2})
    prompts = [cce.with_token(q, context.concept.unacceptable, cce.CCE_TOKEN)
               for q in context.target_prompts]
    weights = [0.0, *MINI.cce.adaptive_weights[-2:]]
    together = cce.invert_tokens(context, p, prompts, weights)[1.0]
    for weight, token in zip(weights, together):
        assert torch.allclose(token, cce.invert_token(context, p, prompts, weight)[1.0],
                              atol=1e-5)
    assert not torch.allclose(together[0], together[-1], atol=1e-5)  # the term is live


def test_a_target_whose_margin_does_not_vary_cannot_be_adapted_to(context):
    flat = LinearProbeFilter(context.attacker, torch.zeros_like(context.attacker.direction), 1.0)
    with pytest.raises(ValueError, match="does not vary"):
        margin_scale(flat, ["Zorbo", "a star"], context.training_images)


@pytest.mark.slow
def test_unlearndiff_prefix_lowers_the_models_denoising_loss_on_the_targets(context):
    """The found prefixes, typed before their target prompts, make the UNet reconstruct the
    target images better on average (fixed noise and timesteps) than the random prefixes they
    started from (production steps: the projected search is noisy over fewer)."""
    from diffusers import DDPMScheduler

    pipe, p = context.pipe, BUDGET["udiff"]
    found = udiff.udiff_candidates(context, p)[1.0]
    assert len(found) == p.candidates
    prompts = list(dict.fromkeys(context.target_prompts))
    assert all(q.endswith(prompts[i % len(prompts)]) for i, q in enumerate(found))
    side = TokenPrompts(pipe.text_encoder, pipe.tokenizer, context.words)
    generator = torch.Generator().manual_seed(context.seed)
    start = side.vocabulary[torch.randint(len(side.vocabulary), (p.candidates, p.tokens),
                                          generator=generator)]
    started = [f"{prefix} {prompts[i % len(prompts)]}"
               for i, prefix in enumerate(side.decode(start))]
    latents = cce.image_latents(pipe, context.target_images)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    @torch.no_grad()
    def loss(texts: list[str]) -> float:
        ids = pipe.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=pipe.tokenizer.model_max_length).input_ids
        states = pipe.text_encoder(ids).last_hidden_state.repeat_interleave(len(latents), 0)
        errors, *_ = cce.denoising_errors(pipe, scheduler, latents.repeat(len(texts), 1, 1, 1),
                                          states, torch.Generator().manual_seed(0))
        return float(errors.mean())

    assert loss(found) < loss(started)


def test_ringbell_release_operators_keep_the_fitter_half_and_cross_at_one_point():
    rng = np.random.default_rng(0)
    vocabulary = np.arange(100, 200)
    ranked = np.arange(2 * 8 * 6).reshape(2, 8, 6)  # rows x population x tokens, fittest first
    p = MINI.ringbell.model_copy(update={"crossover": 1.0, "mutation": 0.0,
                                         "operators": "release"})
    bred = ringbell.OPERATORS["release"](rng, ranked, vocabulary, p)
    assert bred.shape == ranked.shape
    assert np.array_equal(bred[:, :4], ranked[:, :4])  # the fitter half survives
    for row in range(2):
        parents = {tuple(x) for x in ranked[row, :4]}
        for child in bred[row, 4:]:
            cuts = [k for k in range(1, 6) if any(tuple(child[:k]) == tuple(m[:k]) and
                                                  tuple(child[k:]) == tuple(f[k:])
                                                  for m in parents for f in parents)]
            assert cuts  # a prefix of one survivor and the suffix of another
    mutated = ringbell.OPERATORS["release"](
        rng, ranked, vocabulary, p.model_copy(update={"crossover": 0.0, "mutation": 1.0}))
    changed = (mutated[:, 4:] >= 100).sum(-1)
    assert np.all(changed == 1)  # one token per child, from the vocabulary


@pytest.mark.parametrize("operators", ["release", "ours"])
def test_ringbell_scores_a_carried_over_individual_once(context, operators, monkeypatch):
    """Survivors, elites and unchanged copies keep their loss: a search encodes at most the
    planner's count of new individuals (far fewer than population x generations), and its loss
    can be reused because the T2I text encoder gives a row the same bits in any batch."""
    from pipeline import plan

    p = BUDGET["ringbell"].model_copy(update={"operators": operators, "generations": 12})
    encoder, rows = context.pipe.text_encoder, []
    forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda ids, *a, **k: rows.append(len(ids))
                        or forward(ids, *a, **k))
    ringbell.ringbell_candidates(context, p, [0.0])
    searched = sum(rows) - 2 * len(context.pairs) - p.candidates  # less the concept vector, goals
    planned = p.candidates * (p.population + p.generations * plan.ringbell_new_children(p))
    assert p.candidates * p.population < searched <= planned
    assert planned < 0.95 * p.candidates * p.population * (p.generations + 1)
    ids = context.pipe.tokenizer([" ".join(shapes.language()[i:i + 6]) for i in range(40)],
                                 padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        whole = forward(ids).last_hidden_state
        assert torch.equal(forward(ids[7:19]).last_hidden_state, whole[7:19])


def test_world_vocabulary_keeps_hard_prompts_in_the_worlds_language(context):
    """With ``words``, PEZ and RingBell draw only tokens of those words, so their prompts decode
    to text the mini models know (the world's words, possibly glued together)."""
    side = TokenPrompts(context.attacker.clip.text_model, context.attacker.tokenizer,
                        shapes.language())
    assert 30 <= len(side.vocabulary) <= 60  # a few dozen tokens, not CLIP's 49k
    plain = dataclasses.replace(context, target=None)
    budget = BUDGET["pez"].model_copy(update={"steps": 5, "candidates": 3})
    prompts = ATTACKS["pez"](plain, budget)[1.0].prompts
    pieces = sorted({side.tokenizer.decode([i]).strip() for i in side.vocabulary.tolist()},
                    key=len, reverse=True)
    glued = re.compile(f"(?:{'|'.join(map(re.escape, pieces))})+")
    assert prompts and all(glued.fullmatch(word) for p in prompts for word in p.split())


def test_every_attack_runs_plain_once_scored_by_every_crt_and_adapted_to_each():
    """Plain runs first (then their prompts rendered by each edit: the edit's plain condition),
    "+" per filter, then each edit attack through each edited model."""
    assert attack_runs(["pez", "cce"], ["zero_shot", "espresso"], ["uce"], ["cce", "udiff"]) == [
        ("pez", "pez", None, "plain"), ("cce", "cce", None, "plain"),
        ("pez@uce", "pez", "uce", "plain"), ("cce@uce", "cce", "uce", "plain"),
        ("pez+zero_shot", "pez", "zero_shot", "plus"), ("cce+zero_shot", "cce", "zero_shot", "plus"),
        ("pez+espresso", "pez", "espresso", "plus"), ("cce+espresso", "cce", "espresso", "plus"),
        ("cce+uce", "cce", "uce", "plus"), ("udiff+uce", "udiff", "uce", "plus")]
    assert attack_runs(["typo"], [], [], ["udiff"]) == [("typo", "typo", None, "plain")]


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


def test_a_checkpoint_gives_back_the_runs_results_and_images_and_its_inputs_name_it(tmp_path):
    """What a resumed attack stage loads is what the run made, exactly; and the folder it is
    kept in changes with the params, any source file and any input file."""
    from pipeline.attacks import checkpoints
    from pipeline.attacks.context import AttackResult

    rng = np.random.default_rng(0)
    results = {0.5: AttackResult(["a red star"], [0.25], [1.0], [0.0]),
               1.0: AttackResult(["<cce-0> on a black background", "Zorbo"], [0.125, 0.3],
                                 [0.5, 0.75], [0.004, 0.0],
                                 {"<cce-0>": torch.randn(96, generator=torch.Generator())})}
    images = {b: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
              for b, n in ((0.5, 1), (1.0, 2))}
    assert checkpoints.load(tmp_path / "run.seed0") is None
    checkpoints.save(tmp_path / "run.seed0", results, images)
    loaded, loaded_images = checkpoints.load(tmp_path / "run.seed0")
    assert list(loaded) == [0.5, 1.0]
    for budget, result in results.items():
        got = loaded[budget]
        assert (got.prompts, got.objective, got.trial_success, got.adaptive_weights) == (
            result.prompts, result.objective, result.trial_success, result.adaptive_weights)
        assert got.textual_inversion.keys() == result.textual_inversion.keys()
        assert all(torch.equal(got.textual_inversion[k], v)
                   for k, v in result.textual_inversion.items())
        assert np.array_equal(loaded_images[budget], images[budget])
    assert not list(tmp_path.glob(".tmp-*"))

    source, data = tmp_path / "src", tmp_path / "data"
    source.mkdir(), data.mkdir()
    (source / "a.py").write_text("x = 1\n")
    (data / "manifest.csv").write_text("prompt\nZorbo\n")
    base = checkpoints.fingerprint('{"seed": 1}', [data], source)
    assert checkpoints.fingerprint('{"seed": 1}', [data], source) == base
    assert checkpoints.fingerprint('{"seed": 2}', [data], source) != base
    (source / "a.py").write_text("x = 2\n")
    assert checkpoints.fingerprint('{"seed": 1}', [data], source) != base
    (source / "a.py").write_text("x = 1\n")
    (data / "manifest.csv").write_text("prompt\nBlip\n")
    assert checkpoints.fingerprint('{"seed": 1}', [data], source) != base
