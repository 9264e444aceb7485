"""Espresso's fine-tuning objective: every term is live (the authors' release had terms that
cancelled or were constant), only the text side trains, both separation forms and both
optimisers do what they claim, and each setting resolves to its own defaults."""
import copy
import math

import numpy as np
import pytest
import torch
import yaml
from stages import REPO

from pipeline import world
from pipeline.espresso import EspressoFilter, text_embeddings
from pipeline.espresso.losses import SEPARATIONS, contrastive_loss, espresso_loss
from pipeline.finetune import OPTIMIZERS, trainable_text_side
from pipeline.schema import Finetune
from pipeline.mini import shapes

WEIGHTS = {"unacceptable": 1.0, "acceptable": 1.0, "separation": 1.0}
HYPER = {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.2}


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


@pytest.fixture(scope="module")
def finetune_section():
    return yaml.safe_load((REPO / "params.yaml").read_text())["finetune"]


@pytest.mark.parametrize("form", list(SEPARATIONS))
def test_every_loss_term_has_a_gradient_on_the_trained_parameters(zorbo_filter, batch, form):
    params = trainable_text_side(zorbo_filter.clip)
    terms = espresso_loss(zorbo_filter, batch, WEIGHTS, form)
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


def test_separation_forms_give_the_hand_computed_values():
    emb_u = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    emb_a = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    t_u, t_a = torch.tensor([1.0, 0.0]), torch.tensor([0.0, -1.0])
    # pairs: |(1,-1)|^2 = 2 and 0 -> mean 1; concepts: |(1,1)| = sqrt(2), not squared
    assert SEPARATIONS["prompt_pairs"](emb_u, emb_a, t_u, t_a).item() == pytest.approx(1.0)
    assert SEPARATIONS["concepts"](emb_u, emb_a, t_u, t_a).item() == pytest.approx(math.sqrt(2))


def test_the_loss_uses_the_chosen_forms_inputs(zorbo_filter, batch):
    """``prompt_pairs`` reads the batch's paired prompts, ``concepts`` the concept strings."""
    with torch.no_grad():
        emb_u, emb_a = (text_embeddings(zorbo_filter.clip, zorbo_filter.tokenizer, batch[k])
                        for k in ("prompts_u", "prompts_a"))
        pairs = espresso_loss(zorbo_filter, batch, WEIGHTS, "prompt_pairs")["separation"]
        concepts = espresso_loss(zorbo_filter, batch, WEIGHTS, "concepts")["separation"]
    expected_pairs = sum(float((u - a) @ (u - a)) for u, a in zip(emb_u, emb_a)) / len(emb_u)
    assert pairs.item() == pytest.approx(expected_pairs, rel=1e-5)
    assert concepts.item() == pytest.approx(float((zorbo_filter.t_u - zorbo_filter.t_a).norm()),
                                            rel=1e-5)
    assert pairs.item() != pytest.approx(concepts.item(), rel=1e-2)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("form", list(SEPARATIONS))
def test_one_step_on_the_separation_term_alone_increases_it(zorbo_filter, batch, form,
                                                            optimizer):
    only_separation = {"unacceptable": 0.0, "acceptable": 0.0, "separation": 1.0}
    step = OPTIMIZERS[optimizer](zorbo_filter.clip, **{**HYPER, "weight_decay": 0.0})
    before = espresso_loss(zorbo_filter, batch, only_separation, form)
    step.zero_grad()
    before["total"].backward()
    step.step()
    with torch.no_grad():
        after = espresso_loss(zorbo_filter, batch, only_separation, form)["separation"]
    assert after.item() > before["separation"].item() + 1e-4


def one_step(batch, optimizer: str, weight_decay: float):
    """The text side after one step of ``optimizer`` from the shipped CLIP on ``batch``."""
    filt = EspressoFilter.from_clip(str(world.CLIP_DIR), "Zorbo", "a star", device="cpu")
    step = OPTIMIZERS[optimizer](filt.clip, **{**HYPER, "weight_decay": weight_decay})
    step.zero_grad()
    espresso_loss(filt, batch, WEIGHTS, "concepts")["total"].backward()
    step.step()
    return copy.deepcopy(filt.clip.state_dict())


@pytest.mark.slow
def test_adamw_spares_unused_token_embeddings_and_adam_shrinks_them(batch):
    fresh = EspressoFilter.from_clip(str(world.CLIP_DIR), "Zorbo", "a star", device="cpu")
    start = fresh.clip.state_dict()
    texts = batch["prompts_u"] + batch["prompts_a"] + ["Zorbo", "a star"]
    used = {i for ids in fresh.tokenizer(texts).input_ids for i in ids}
    unused = next(i for i in range(len(fresh.tokenizer)) if i not in used)
    tokens, projection = "text_model.embeddings.token_embedding.weight", "text_projection.weight"

    adamw, adamw_no_decay = one_step(batch, "adamw", 0.2), one_step(batch, "adamw", 0.0)
    adam = one_step(batch, "adam", 0.2)
    assert start[tokens][unused].norm() > 0
    assert torch.equal(adamw[tokens][unused], start[tokens][unused])
    assert adam[tokens][unused].norm() < start[tokens][unused].norm() * (1 - 1e-4)
    # same gradients, so the only difference is AdamW's decoupled decay: -lr * wd * W
    decay = adamw[projection] - adamw_no_decay[projection]
    assert torch.allclose(decay, -HYPER["lr"] * 0.2 * start[projection], atol=1e-7)
    assert decay.abs().max() > 0


def test_each_setting_resolves_its_own_defaults(finetune_section):
    finetune = Finetune.model_validate(finetune_section)
    paper = finetune.of("paper")
    assert (paper.epochs_of("nudity"), paper.optimizer, paper.separation) == (
        72, "adam", "prompt_pairs")
    assert paper.epochs_of("grumpy_cat") == 100
    mini = finetune.of("mini")
    assert mini.model_dump(exclude_unset=True) == finetune_section["mini"]
    assert (mini.separation, mini.optimizer, mini.epochs_of("zorbo")) == ("concepts", "adamw", 10)
