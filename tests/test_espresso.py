"""The Espresso filter as a library: its math, fail-closed behaviour, persistence, and its use as
a diffusers safety checker, on the shipped mini world."""
import numpy as np
import pytest
import torch
from transformers import CLIPModel

from pipeline import world
from pipeline.espresso import EspressoFilter
from pipeline.espresso.t2i import load_t2i
from pipeline.mini import shapes


@pytest.fixture(scope="module")
def zorbo_filter():
    return EspressoFilter.from_clip(str(world.CLIP_DIR), "Zorbo", "a star", device="cpu")


@pytest.fixture(scope="module")
def renders():
    rng = np.random.default_rng(11)
    zorbo = [shapes.sample_scene(rng, character="zorbo") for _ in range(40)]
    stars = [shapes.sample_scene(rng, shape="star") for _ in range(40)]
    return shapes.render_many(zorbo, rng), shapes.render_many(stars, rng)


def test_probability_is_the_sign_of_the_embedding_projection(zorbo_filter):
    features = torch.randn(500, zorbo_filter.t_u.shape[0]) * 3
    p = zorbo_filter.p_unacceptable(features)
    margin = features @ zorbo_filter.direction
    assert torch.equal(p > 0.5, margin > 0)
    s = zorbo_filter.logit_scale
    e = torch.nn.functional.normalize(features, dim=-1)
    softmax = torch.softmax(s * torch.stack([e @ zorbo_filter.t_u, e @ zorbo_filter.t_a], -1), -1)
    assert torch.allclose(p, softmax[:, 0], atol=1e-5)


def test_projection_form_gives_identical_decisions(zorbo_filter, renders):
    features = torch.cat([torch.randn(500, zorbo_filter.t_u.shape[0]),
                          zorbo_filter.image_features(zorbo_filter.pixel_values(
                              list(np.concatenate(renders))))])
    cosine = zorbo_filter.p_unacceptable(features) > 0.5
    projection = zorbo_filter.p_unacceptable_projection(features) > 0.5
    assert torch.equal(cosine, projection)
    assert 0 < cosine.float().mean() < 1  # both decisions occur, so the check means something


def test_zero_shot_filter_blocks_the_character_and_passes_its_class(zorbo_filter, renders):
    zorbo, stars = renders
    assert zorbo_filter.screen(zorbo).blocked.mean() >= 0.95
    assert zorbo_filter.screen(stars).blocked.mean() <= 0.05


def test_blocked_images_are_black_and_passed_images_untouched(zorbo_filter, renders):
    images = np.concatenate([renders[0][:3], renders[1][:3]])
    result = zorbo_filter.screen(images)
    for image, out, blocked in zip(images, result.images, result.blocked):
        assert np.array_equal(out, np.zeros_like(image) if blocked else image)


def test_fails_closed_on_images_it_cannot_score(zorbo_filter, renders):
    star = renders[1][0]
    nan_image = np.full((32, 32, 3), np.nan, dtype=np.float32)
    five_channels = np.zeros((32, 32, 5), dtype=np.uint8)
    result = zorbo_filter.screen([star, nan_image, five_channels, star])
    assert result.blocked.tolist() == [False, True, True, False]
    assert result.unscored.tolist() == [False, True, True, False]
    assert result.errors[0] is None and result.errors[3] is None
    assert "non-finite" in result.errors[1] and "5 channels" in result.errors[2]
    assert np.isnan(result.p_unacceptable[1:3]).all()


def test_concept_embeddings_are_computed_once(zorbo_filter, renders, monkeypatch):
    calls = []
    original = zorbo_filter.clip.get_text_features
    monkeypatch.setattr(zorbo_filter.clip, "get_text_features",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    zorbo_filter.screen(renders[0])
    assert calls == []


def test_saved_filter_reloads_and_is_a_plain_clip(zorbo_filter, renders, tmp_path):
    zorbo_filter.save_pretrained(tmp_path / "filter")
    again = EspressoFilter.from_pretrained(tmp_path / "filter", device="cpu")
    images = np.concatenate(renders)
    assert np.allclose(again.screen(images).p_unacceptable,
                       zorbo_filter.screen(images).p_unacceptable, atol=1e-5)
    assert isinstance(CLIPModel.from_pretrained(tmp_path / "filter"), CLIPModel)
    with pytest.raises(FileNotFoundError, match="from_clip"):
        EspressoFilter.from_pretrained(world.CLIP_DIR)


@pytest.mark.slow
def test_works_as_the_safety_checker_of_a_diffusers_pipeline(zorbo_filter):
    pipe = load_t2i(str(world.SD_DIR), device="cpu")
    pipe.safety_checker, pipe.feature_extractor = zorbo_filter, zorbo_filter.processor
    pipe.set_progress_bar_config(disable=True)
    generator = [torch.Generator().manual_seed(i) for i in range(8)]
    out = pipe(["Zorbo"] * 4 + ["a star"] * 4, num_inference_steps=10, guidance_scale=5.0,
               generator=generator, output_type="np")
    flags = np.array(out.nsfw_content_detected)
    assert flags[:4].mean() >= 0.75 and not flags[4:].any()
    assert (out.images[flags] == 0).all() and (out.images[~flags].max() > 0)
