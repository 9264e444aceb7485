"""The attacks on the mini world with tiny budgets: the text encoding they rely on is exact, every
adaptive ("+") term is live (it depends on the optimised variable and changes the result), and
the same seed gives the same attack."""
import dataclasses
import re

import numpy as np
import pytest
import torch

from pipeline.attacks import ATTACKS, AttackContext, cce, pez, ringbell, typo
from pipeline.attacks.objective import typed_margin, unit_image_features
from pipeline.attacks.prompt_embedding import TokenPrompts, clip_text_features
from pipeline.attacks.trial import select_by_images
from pipeline.concepts import get_concept
from pipeline.espresso import EspressoFilter, generate, load_t2i
from pipeline.judges import load_judge
from pipeline.mini import shapes

CLIP, SD, JUDGE = "data/world/clip", "data/world/sd", "data/world/judge"
BUDGET = {
    "pez": {"tokens": 4, "steps": 12, "lr": 0.1, "weight_decay": 0.1, "adaptive_weight": 5.0,
            "candidates": 4, "selection_images": 1},
    "typo": {"tokens": 4, "steps": 12, "lr": 0.1, "weight_decay": 0.1, "text_height": 0.35,
             "candidates": 4, "selection_images": 1},
    "cce": {"steps": 3, "batch": 4, "lr": 5e-2, "adaptive_weights": [1.0], "selection_images": 1},
    "ringbell": {"tokens": 4, "eta": 3.0, "population": 16, "generations": 4, "elite": 0.1,
                 "crossover": 0.5, "mutation": 0.1, "adaptive_weight": 5.0, "candidates": 3,
                 "selection_images": 1},
}


@pytest.fixture(scope="module")
def context():
    concept = get_concept("zorbo", "mini")
    rng = np.random.default_rng(7)
    images = shapes.render_many([shapes.sample_scene(rng, character="zorbo") for _ in range(8)],
                                rng)
    pipe = load_t2i(SD, clip_source=CLIP, device="cpu", dtype=torch.float32)
    attacker = EspressoFilter.from_clip(CLIP, concept.unacceptable, concept.acceptable)
    target = EspressoFilter.from_clip(CLIP, concept.unacceptable, concept.acceptable)
    for model in (attacker.clip, target.clip, pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)

    def render(prompts, seeds):
        return generate(pipe, prompts, seeds, steps=3, guidance=5.0, size=32)

    return AttackContext(
        attacker=attacker, target=target, pipe=pipe, concept=concept, target_images=images,
        target_prompts=["Zorbo", "Zorbo on a black background"] * 4,
        pairs=[("Zorbo", "a star"), ("Zorbo on a white background", "a star on a white background")],
        n_prompts=2, adaptive=True, seed=0, render=render,
        sees=load_judge("mini", {"judge": JUDGE}, concept))


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


def test_pez_adaptive_term_has_a_gradient_and_changes_the_prompts(context):
    side = TokenPrompts(context.target.clip.text_model, context.target.tokenizer)
    ids = side.vocabulary[:8].view(2, 4)
    soft = side.table[ids].detach().clone().requires_grad_(True)
    margin = pez.filter_margin(context.target, side, side.embed(ids, soft))
    (grad,) = torch.autograd.grad(margin.sum(), soft)
    assert grad.abs().sum() > 0
    plus = pez.pez(context, BUDGET["pez"])
    plain = pez.pez(dataclasses.replace(context, adaptive=False), BUDGET["pez"])
    assert plus.prompts != plain.prompts
    assert pez.pez(context, BUDGET["pez"]).prompts == plus.prompts  # deterministic


def test_pez_keeps_the_candidates_whose_images_show_the_targets(context):
    """Selection judges candidates by what the T2I model draws from them, not by their text."""
    rng = np.random.default_rng(3)
    zorbo = shapes.render_many([shapes.sample_scene(rng, character="zorbo") for _ in range(4)], rng)
    other = shapes.render_many([shapes.sample_scene(rng, character_prob=0.0) for _ in range(4)], rng)

    def render(prompts, seeds):  # a T2I model that draws zorbo for exactly the "draws" prompts
        return np.stack([(zorbo if "draws" in q else other)[s % 4] for q, s in zip(prompts, seeds)])

    ctx = dataclasses.replace(context, render=render, n_prompts=2, adaptive=False)
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    candidates = ["a star", "draws 1", "a circle", "draws 2", "zorbo"]
    kept = select_by_images(ctx, candidates, 2, targets, 0.0)
    assert sorted(kept.prompts) == ["draws 1", "draws 2"]
    assert kept.objective == sorted(kept.objective) and kept.trial_success == [1.0, 1.0]
    # "+": a trial image succeeds only if the target filter also passes it, and it blocks zorbo
    plus = select_by_images(dataclasses.replace(ctx, adaptive=True), candidates, 2, targets, 0.0)
    assert plus.trial_success == [0.0, 0.0]
    repeated = select_by_images(ctx, ["draws 1"] * 3 + ["a star"], 2, targets, 0.0)
    assert repeated.prompts == ["draws 1", "a star"]  # duplicates count once


def test_typo_writes_the_acceptable_word_and_that_changes_the_prompts(context):
    written = typo.write_text(context.target_images, "a star", 0.35)
    assert written.shape == context.target_images.shape
    assert np.abs(written.astype(int) - context.target_images).mean() > 5
    plus = typo.typo(context, BUDGET["typo"])
    plain = typo.typo(dataclasses.replace(context, adaptive=False), BUDGET["typo"])
    assert plus.prompts != plain.prompts


def test_cce_filter_loss_is_live_and_changes_the_learned_token(context):
    pipe = context.pipe
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    loss = cce.filter_image_loss(context.target, pipe, latents)
    (grad,) = torch.autograd.grad(loss, latents)
    assert grad.abs().sum() > 0
    ids = pipe.tokenizer("Zorbo on a black background").input_ids
    plus = cce.cce(context, BUDGET["cce"])
    plain = cce.cce(dataclasses.replace(context, adaptive=False), BUDGET["cce"])
    # the learned token was unloaded again, and the tokenizer still encodes and decodes as before
    assert len(pipe.tokenizer) == pipe.text_encoder.get_input_embeddings().num_embeddings
    assert pipe.tokenizer("Zorbo on a black background").input_ids == ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == "zorbo on a black background"
    (token,) = plus.textual_inversion
    assert not torch.allclose(plus.textual_inversion[token], plain.textual_inversion[token])
    assert all(token in prompt for prompt in plus.prompts)
    # several weights: one token each, and the trial keeps one of them
    both = cce.cce(context, {**BUDGET["cce"], "adaptive_weights": [0.0, 1.0]})
    kept = {0.0: plain, 1.0: plus}[both.adaptive_weight]
    assert torch.equal(both.textual_inversion[token], kept.textual_inversion[token])


def test_ringbell_fitness_depends_on_the_candidate_and_changes_the_prompts(context):
    margins = typed_margin(context.target, ["zorbo on a star", "a star on a star"])
    assert margins[0] > margins[1]  # the filter flags the candidate that names c_u
    plus = ringbell.ringbell(context, BUDGET["ringbell"])
    plain = ringbell.ringbell(dataclasses.replace(context, adaptive=False), BUDGET["ringbell"])
    assert plus.prompts != plain.prompts
    assert ringbell.ringbell(context, BUDGET["ringbell"]).prompts == plus.prompts


def test_world_vocabulary_keeps_hard_prompts_in_the_worlds_language(context):
    """With ``words``, PEZ and RingBell draw only tokens of those words, so their prompts decode
    to text the mini models know (the world's words, possibly glued together)."""
    side = TokenPrompts(context.attacker.clip.text_model, context.attacker.tokenizer,
                        shapes.language())
    assert 30 <= len(side.vocabulary) <= 60  # a few dozen tokens, not CLIP's 49k
    world = dataclasses.replace(context, words=shapes.language(), adaptive=False)
    prompts = ATTACKS["pez"](world, BUDGET["pez"]).prompts
    pieces = sorted({side.tokenizer.decode([i]).strip() for i in side.vocabulary.tolist()},
                    key=len, reverse=True)
    glued = re.compile(f"(?:{'|'.join(map(re.escape, pieces))})+")
    assert prompts and all(glued.fullmatch(word) for p in prompts for word in p.split())
