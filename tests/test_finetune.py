"""Espresso's fine-tuning objective: every term is live (the authors' release had terms that
cancelled or were constant), only the text side trains, and training separates the concepts."""
import numpy as np
import pytest
import torch

from pipeline import shapes, world
from pipeline.espresso import EspressoFilter
from pipeline.finetune import contrastive_loss, espresso_loss, trainable_text_side

WEIGHTS = {"unacceptable": 1.0, "acceptable": 1.0, "separation": 1.0}


@pytest.fixture()
def zorbo_filter():
    return EspressoFilter.from_clip(str(world.CLIP_DIR), "Zorbo", "a star", device="cpu")


@pytest.fixture(scope="module")
def batch():
    """Real image embeddings of Zorbo and plain stars with aligned prompts."""
    filt = EspressoFilter.from_clip(str(world.CLIP_DIR), "Zorbo", "a star", device="cpu")
    rng = np.random.default_rng(0)
    backgrounds = list(shapes.BACKGROUNDS)
    zorbo = [shapes.sample_scene(rng, character="zorbo", background=b) for b in backgrounds]
    stars = [shapes.sample_scene(rng, shape="star", background=b) for b in backgrounds]
    with torch.no_grad():
        def embed(scenes):
            pixels = filt.pixel_values(list(shapes.render_many(scenes, rng)))
            return torch.nn.functional.normalize(filt.image_features(pixels), dim=-1)
        return {"images_u": embed(zorbo), "images_a": embed(stars),
                "prompts_u": [f"Zorbo on a {b} background" for b in backgrounds],
                "prompts_a": [f"a star on a {b} background" for b in backgrounds]}


def test_every_loss_term_has_a_gradient_on_the_trained_parameters(zorbo_filter, batch):
    params = trainable_text_side(zorbo_filter.clip)
    terms = espresso_loss(zorbo_filter, batch, WEIGHTS)
    for name in ("unacceptable", "acceptable", "separation"):
        grads = torch.autograd.grad(terms[name], params, retain_graph=True, allow_unused=True)
        norm = sum(float(g.norm()) for g in grads if g is not None)
        assert norm > 1e-6, f"the {name} term does not move the text side"
    projection_grad = torch.autograd.grad(terms["total"], zorbo_filter.clip.text_projection.weight)
    assert float(projection_grad[0].norm()) > 0, "the text projection must be trained too"


def test_only_the_text_side_is_trainable(zorbo_filter):
    trainable_text_side(zorbo_filter.clip)
    clip = zorbo_filter.clip
    assert not any(p.requires_grad for p in clip.vision_model.parameters())
    assert not clip.visual_projection.weight.requires_grad and not clip.logit_scale.requires_grad
    assert all(p.requires_grad for p in clip.text_model.parameters())


def test_contrastive_terms_are_not_constant(zorbo_filter, batch):
    text = torch.nn.functional.normalize(torch.randn(4, batch["images_u"].shape[1]), dim=-1)
    matched = contrastive_loss(batch["images_u"], batch["images_u"], batch["prompts_u"], 30.0)
    shuffled = contrastive_loss(batch["images_u"], text, batch["prompts_u"], 30.0)
    assert matched < shuffled


def test_a_few_steps_separate_the_concepts(zorbo_filter, batch):
    optimizer = torch.optim.Adam(trainable_text_side(zorbo_filter.clip), lr=1e-4)
    before = espresso_loss(zorbo_filter, batch, WEIGHTS)["separation"].item()
    for _ in range(5):
        loss = espresso_loss(zorbo_filter, batch, {**WEIGHTS, "separation": 10.0})["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert espresso_loss(zorbo_filter, batch, WEIGHTS)["separation"].item() > before
