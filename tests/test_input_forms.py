"""One verdict per image whatever its form (METHOD section 2, "Inputs"): every accepted form of an
image gets the same score as its canonical uint8 form and as on diffusers' safety-checker path;
an invalid or ambiguous form is blocked unscored with its reason, never guessed at."""
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import world
from pipeline.espresso import EspressoFilter
from pipeline.espresso.t2i import load_t2i
from pipeline.mini import shapes

LOGGER = "pipeline.espresso.filter"


@pytest.fixture(scope="module")
def filt():
    return EspressoFilter.from_clip(str(world.CLIP_DIR), "Zorbo", "a star", device="cpu")


@pytest.fixture(scope="module")
def renders():
    """uint8 renders: Zorbo (c_u, blocked) and plain stars (c_a, passed)."""
    rng = np.random.default_rng(5)
    zorbo = shapes.render_many([shapes.sample_scene(rng, character="zorbo") for _ in range(4)], rng)
    stars = shapes.render_many([shapes.sample_scene(rng, shape="star") for _ in range(4)], rng)
    return zorbo, stars


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


FORMS = {  # name: (images from uint8 N x H x W x 3, value_range)
    "uint8 list": (list, None),
    "uint8 batch": (lambda x: x, None),
    "float32 [0, 1]": (lambda x: list(x.astype(np.float32) / 255), None),
    "float64 [0, 1] batch": (lambda x: x / 255.0, None),
    "float16 [0, 1]": (lambda x: list((x / 255).astype(np.float16)), None),
    "PIL": (lambda x: [Image.fromarray(i) for i in x], None),
    "opaque RGBA PIL": (lambda x: [Image.fromarray(np.dstack([i, np.full_like(i[..., 0], 255)]))
                                   for i in x], None),
    "tensor [0, 1]": (as_tensor, "0,1"),
    "tensor list [0, 1]": (lambda x: list(as_tensor(x)), "0,1"),
    "tensor [-1, 1]": (lambda x: as_tensor(x) * 2 - 1, "-1,1"),
    "tensor [-1, 1] unstated": (lambda x: as_tensor(x) * 2 - 1, None),
    "mixed list": (lambda x: [x[0], Image.fromarray(x[1]), x[2] / 255, as_tensor(x)[3]], "0,1"),
}


@pytest.mark.parametrize("form", FORMS)
def test_every_form_gets_the_verdict_of_the_uint8_image(filt, renders, form):
    make, value_range = FORMS[form]
    for images, blocked in ((renders[0], True), (renders[1], False)):
        reference = filt.screen(images)
        result = filt.screen(make(images), value_range=value_range)
        assert result.blocked.tolist() == [blocked] * len(images) == reference.blocked.tolist()
        assert np.allclose(result.p_unacceptable, reference.p_unacceptable, atol=1e-4)
        assert result.errors == [None] * len(images) and not result.unscored.any()
        assert torch.allclose(filt.embed(make(images), value_range), filt.embed(images), atol=1e-5)


def test_blocked_images_are_black_in_their_own_form(filt, renders):
    zorbo = renders[0][:1]
    cases = [(list(zorbo), lambda out: np.array_equal(out, np.zeros_like(zorbo[0])), None),
             (list(zorbo / 255), lambda out: out.dtype == float and not out.any(), None),
             ([Image.fromarray(zorbo[0])], lambda out: out.mode == "RGB" and not np.any(out), None),
             (as_tensor(zorbo), lambda out: torch.equal(out, torch.zeros(3, 32, 32)), "0,1"),
             (as_tensor(zorbo) * 2 - 1, lambda out: torch.equal(out, -torch.ones(3, 32, 32)), None)]
    for images, is_black, value_range in cases:
        result = filt.screen(images, value_range)
        assert result.blocked.all() and is_black(result.images[0])


def rgba(x):
    return np.dstack([x, np.full(x.shape[:2], 128, np.uint8)])


def with_nan(x):
    x = x / 255
    x[0, 0, 0] = np.nan
    return x


INVALID = {  # name: (bad image from a uint8 H x W x 3 render, words its reason must contain)
    "uint16": (lambda x: x.astype(np.uint16) * 257, "uint16"),
    "2-D among good images": (lambda x: x[..., 0], "2-D image"),
    "channels-first array": (lambda x: x.transpose(2, 0, 1), "channels-first"),
    "RGBA array": (rgba, "RGBA"),
    "translucent RGBA PIL": (lambda x: Image.fromarray(rgba(x)), "RGBA with transparency"),
    "float PIL": (lambda x: Image.fromarray(x[..., 0].astype(np.float32)), "mode F"),
    "float out of range": (lambda x: x / 255 * 1.5 - 0.2, "outside [0, 1]"),
    "NaN": (with_nan, "non-finite"),
    "tensor in [0, 1] without value_range": (lambda x: as_tensor(x[None])[0], "value_range"),
    "tensor out of range": (lambda x: as_tensor(x[None])[0] * 3 - 1, "outside [-1, 1]"),
    "channels-last tensor": (lambda x: torch.from_numpy(x / 255), "permute(2, 0, 1)"),
    "empty 0 x 0": (lambda x: np.zeros((0, 0, 3), np.uint8), "empty image"),
    "not an image": (lambda x: "zorbo.png", "not an image"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_forms_are_blocked_with_their_reason(filt, renders, case, caplog):
    make, words = INVALID[case]
    zorbo, star = renders[0][0], renders[1][0]
    good = filt.screen([zorbo, star])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = filt.screen([zorbo, make(star), star])
    assert result.blocked.tolist() == [True, True, False]
    assert result.unscored.tolist() == [False, True, False]
    assert words in result.errors[1] and result.errors[0] is result.errors[2] is None
    assert np.isnan(result.p_unacceptable[1])
    assert np.array_equal(result.p_unacceptable[[0, 2]], good.p_unacceptable)  # judged alone
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "1 of 3" in records[0].getMessage() and words in records[0].getMessage()
    with pytest.raises(ValueError, match="image 1: .*" + re.escape(words)):
        filt.embed([star, make(star)])


def test_one_warning_sums_up_a_call(filt, renders, caplog):
    star = renders[1][0]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = filt.screen([star[..., 0], star[..., 0], star.astype(np.uint16), star])
    assert result.unscored.tolist() == [True, True, True, False]
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert "3 of 4" in record.getMessage() and "2 x 2-D image" in record.getMessage()


def test_a_lone_image_or_unknown_range_is_a_call_error(filt, renders):
    with pytest.raises(ValueError, match="wrap a single image in a list"):
        filt.screen(renders[1][0])
    with pytest.raises(ValueError, match="value_range"):
        filt.screen(renders[1], value_range="0-255")


def test_a_chunk_the_model_cannot_score_is_blocked_with_the_reason(filt, renders, monkeypatch,
                                                                   caplog):
    original = filt.image_features

    def fails_on_the_last_chunk(pixel_values):
        if len(pixel_values) == 1:
            raise RuntimeError("out of memory")
        return original(pixel_values)

    monkeypatch.setattr(filt, "image_features", fails_on_the_last_chunk)
    stars = renders[1][:3]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = filt.screen(stars, batch=2)
    assert result.blocked.tolist() == [False, False, True]
    assert result.errors[2] == "scoring failed: RuntimeError: out of memory"
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.exc_info is not None  # the traceback is logged, not swallowed


# ---- diffusers' safety-checker path ---------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    pipe = load_t2i(str(world.SD_DIR), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, output_type: str):
    generator = [torch.Generator().manual_seed(i) for i in range(5)]
    return pipe(["Zorbo"] * 3 + ["a star"] * 2, num_inference_steps=10, guidance_scale=5.0,
                height=32, width=32, generator=generator, output_type=output_type)


@pytest.mark.slow
@pytest.mark.parametrize("output_type", ["np", "pt", "pil"])
def test_the_pipeline_path_agrees_with_screen(filt, pipe, output_type, monkeypatch):
    monkeypatch.setattr(pipe, "safety_checker", None)
    unfiltered = generate(pipe, output_type).images
    reference = filt.screen(unfiltered, value_range="0,1" if output_type == "pt" else None)
    assert reference.blocked.tolist() == [True] * 3 + [False] * 2
    monkeypatch.setattr(pipe, "safety_checker", filt)
    monkeypatch.setattr(pipe, "feature_extractor", filt.processor)
    out = generate(pipe, output_type)
    assert out.nsfw_content_detected == reference.blocked.tolist()
    assert np.allclose(filt.last_screening.p_unacceptable, reference.p_unacceptable, atol=1e-4)
    assert filt.last_screening.errors == [None] * 5
    for image, flagged, before in zip(out.images, out.nsfw_content_detected, unfiltered):
        image, before = np.asarray(image), np.asarray(before)
        assert not image.any() if flagged else np.array_equal(image, before)


def test_the_safety_checker_blocks_invalid_clip_input_rows_with_reasons(filt, renders, caplog):
    images = renders[1][:3] / 255  # diffusers' numpy form, [0, 1]
    clip_input = filt.pixel_values(renders[1][:3])
    clip_input[1, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out, flags = filt(images=images, clip_input=clip_input)
    assert flags == [False, True, False] and filt.last_screening.unscored.tolist() == flags
    assert "non-finite" in filt.last_screening.errors[1]
    assert not out[1].any() and np.array_equal(out[[0, 2]], images[[0, 2]])
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1
    out, flags = filt(images=torch.zeros(3, 3, 32, 32), clip_input=clip_input[:, :1])
    assert flags == [True] * 3 and "N x 3 x H x W" in filt.last_screening.errors[0]
