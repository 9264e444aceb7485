"""Every PIL mode is converted to the picture it shows, exactly, or refused with its reason
(METHOD section 2, "Inputs"; ``pipeline.espresso.pil_modes``): one test per mode against known
answers, through the one conversion that ``canonical_image`` and ``pipeline.screen`` share; and
a 16-bit grey PNG is screened as its grey picture, not as white."""
import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pipeline import screen
from pipeline.espresso import ConceptChecker, ImageFormError, canonical_image
from pipeline.espresso.pil_modes import (ALPHA, CONVERTED, SIXTEEN_BIT, one_rgb,
                                         rgb_versions)
from pipeline.mini import shapes

CHECKER = str(Path(__file__).resolve().parents[1] / "data" / "checker")


def pixels(image: PIL.Image.Image) -> list:
    """The RGB pixels of each version, as nested lists (``H x W x 3``)."""
    versions = rgb_versions(image)
    assert all(v.mode == "RGB" and v.size == image.size for v in versions)
    return [np.asarray(v).tolist() for v in versions]


def grey(*values: int) -> list:
    """One row of RGB grey pixels."""
    return [[[v, v, v] for v in values]]


def png(image: PIL.Image.Image, **options) -> PIL.Image.Image:
    """``image`` through a PNG file (how files carry a transparency key)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    buffer.seek(0)
    return PIL.Image.open(buffer)


def palette_image(transparency=None) -> PIL.Image.Image:
    """A 2 x 1 palette image: index 0 (10, 20, 30), index 1 (200, 100, 50)."""
    image = PIL.Image.frombytes("P", (2, 1), bytes([0, 1]))
    image.putpalette([10, 20, 30, 200, 100, 50])
    return image if transparency is None else png(image, transparency=transparency)


# ---- modes PIL converts ---------------------------------------------------------------------
def test_rgb_is_kept_as_is():
    values = np.array([[[1, 2, 3], [250, 128, 0]]], np.uint8)
    assert pixels(PIL.Image.fromarray(values)) == [values.tolist()]


def test_l_is_grey():
    assert pixels(PIL.Image.fromarray(np.array([[0, 77, 255]], np.uint8))) == [grey(0, 77, 255)]


def test_1_is_black_and_white():
    assert pixels(PIL.Image.frombytes("1", (2, 1), bytes([0b01000000]))) == [grey(0, 255)]


def test_p_without_transparency_is_its_palette_colours():
    assert pixels(palette_image()) == [[[[10, 20, 30], [200, 100, 50]]]]


def test_cmyk_is_pil_s_conversion():
    """PIL's CMYK -> RGB: (255 - c) * (255 - k) / 255, rounded."""
    image = PIL.Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 100, 50, 0, 50,
                                                      0, 0, 0, 255]))
    assert pixels(image) == [[[[255, 255, 255], [125, 165, 205], [0, 0, 0]]]]


def test_ycbcr_is_the_jpeg_conversion():
    """JPEG's YCbCr: R = Y + 1.402 (Cr - 128), B = Y + 1.772 (Cb - 128): (76, 85, 255) is red."""
    image = PIL.Image.frombytes("YCbCr", (2, 1), bytes([255, 128, 128, 76, 85, 255]))
    assert pixels(image) == [[[[255, 255, 255], [254, 0, 0]]]]


def test_lab_mid_grey_is_srgb_119():
    """L* = 128/255 * 100 = 50.2 and a* = b* = 0 (PIL stores them as signed bytes): Y = 0.186,
    sRGB grey 119."""
    assert pixels(PIL.Image.frombytes("LAB", (1, 1), bytes([128, 0, 0]))) == [grey(119)]


def test_hsv_is_its_hue():
    """Hue 0 is red, 85/255 of the circle (120 degrees) green; no saturation is grey."""
    image = PIL.Image.frombytes("HSV", (3, 1), bytes([0, 255, 255, 85, 255, 255, 0, 0, 128]))
    assert pixels(image) == [[[[255, 0, 0], [0, 255, 0], [128, 128, 128]]]]


def test_rgbx_drops_its_padding_byte():
    image = PIL.Image.frombytes("RGBX", (1, 1), bytes([1, 2, 3, 99]))
    assert pixels(image) == [[[[1, 2, 3]]]]


# ---- 16- and 32-bit integers, floats ------------------------------------------------------
SIXTEEN_VALUES = [0, 128, 129, 32896, 65535]  # round(v / 257): 0, 0, 1, 128, 255
EIGHT_BIT = grey(0, 0, 1, 128, 255)


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"),
                                         ("I;16N", "=u2")])
def test_16_bit_grey_is_scaled_to_8_bits(mode, dtype):
    image = PIL.Image.frombytes(mode, (5, 1), np.array(SIXTEEN_VALUES, dtype).tobytes())
    assert np.asarray(image).tolist() == [SIXTEEN_VALUES]  # the values as PIL holds them
    assert pixels(image) == [EIGHT_BIT]


def test_32_bit_integers_within_16_bits_are_scaled_the_same():
    image = PIL.Image.fromarray(np.array([SIXTEEN_VALUES], np.int32))
    assert image.mode == "I" and pixels(image) == [EIGHT_BIT]


@pytest.mark.parametrize("value", [70000, -1])
def test_32_bit_integers_beyond_16_bits_are_refused(value):
    image = PIL.Image.fromarray(np.array([[0, value, 255]], np.int32))
    with pytest.raises(ImageFormError) as info:
        rgb_versions(image)
    assert str(info.value).startswith(
        f"PIL image in mode I (32-bit integer) with values {min(value, 0)}..{max(value, 255)}, "
        "outside 0..65535: its value range is unknown")
    assert "float array scaled to [0, 1]" in str(info.value)


def test_floats_are_refused():
    image = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    with pytest.raises(ImageFormError, match=r"mode F \(32-bit float\): its value range is "
                                             r"unknown.*uint8 image, or a float array scaled "
                                             r"to \[0, 1\]"):
        rgb_versions(image)


# ---- transparency ---------------------------------------------------------------------------
def test_opaque_rgba_drops_its_alpha():
    values = np.array([[[1, 2, 3, 255], [250, 128, 0, 255]]], np.uint8)
    assert pixels(PIL.Image.fromarray(values, "RGBA")) == [values[..., :3].tolist()]


def test_translucent_rgba_is_composited_over_black_and_over_white():
    """round((c a + b (255 - a)) / 255): 200 at alpha 128 is 100 over black, 227 over white;
    a transparent pixel is the background; an opaque one its colour on both."""
    values = np.array([[[200, 100, 0, 128], [9, 9, 9, 0], [1, 2, 3, 255]]], np.uint8)
    assert pixels(PIL.Image.fromarray(values, "RGBA")) == [
        [[[100, 50, 0], [0, 0, 0], [1, 2, 3]]],
        [[[227, 177, 127], [255, 255, 255], [1, 2, 3]]]]


def test_half_transparent_la_yields_two_composites():
    image = PIL.Image.fromarray(np.array([[[200, 128], [100, 255]]], np.uint8), "LA")
    assert pixels(image) == [grey(100, 100), grey(227, 100)]


def test_opaque_la_drops_its_alpha():
    image = PIL.Image.fromarray(np.array([[[200, 255], [100, 255]]], np.uint8), "LA")
    assert pixels(image) == [grey(200, 100)]


def test_premultiplied_rgba_is_composited_from_its_stored_colour():
    """RGBa stores c a / 255: over black that, over white that + 255 - a."""
    image = PIL.Image.frombytes("RGBa", (2, 1), bytes([100, 50, 0, 128, 7, 8, 9, 255]))
    assert pixels(image) == [[[[100, 50, 0], [7, 8, 9]]], [[[227, 177, 127], [7, 8, 9]]]]


def test_premultiplied_la_is_composited_from_its_stored_grey():
    image = PIL.Image.frombytes("La", (2, 1), bytes([100, 128, 7, 255]))
    assert pixels(image) == [grey(100, 7), grey(227, 7)]


def test_pa_is_its_palette_colour_through_alpha():
    image = PIL.Image.frombytes("PA", (2, 1), bytes([0, 0, 1, 255]))
    image.putpalette([10, 20, 30, 200, 100, 50])
    assert pixels(image) == [[[[0, 0, 0], [200, 100, 50]]], [[[255, 255, 255], [200, 100, 50]]]]


def test_p_with_a_transparent_entry_is_composited():
    assert pixels(palette_image(transparency=0)) == [[[[0, 0, 0], [200, 100, 50]]],
                                                     [[[255, 255, 255], [200, 100, 50]]]]


def test_p_with_palette_alpha_is_composited():
    """Entry 0 at alpha 128: (10, 20, 30) -> (5, 10, 15) over black, (132, 137, 142) over white."""
    assert pixels(palette_image(transparency=bytes([128, 255]))) == [
        [[[5, 10, 15], [200, 100, 50]]], [[[132, 137, 142], [200, 100, 50]]]]


def test_p_whose_transparent_entry_is_unused_is_opaque():
    image = png(PIL.Image.frombytes("P", (2, 1), bytes([1, 1])), transparency=0)
    image.putpalette([10, 20, 30, 200, 100, 50])
    assert image.info["transparency"] == 0
    assert pixels(image) == [[[[200, 100, 50], [200, 100, 50]]]]


def test_l_with_a_transparent_key_is_composited():
    image = png(PIL.Image.fromarray(np.array([[5, 9]], np.uint8)), transparency=5)
    assert image.mode == "L" and pixels(image) == [grey(0, 9), grey(255, 9)]


def test_rgb_with_a_transparent_key_is_composited():
    values = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    image = png(PIL.Image.fromarray(values), transparency=(1, 2, 3))
    assert image.mode == "RGB" and pixels(image) == [[[[0, 0, 0], [4, 5, 6]]],
                                                     [[[255, 255, 255], [4, 5, 6]]]]


def test_16_bit_grey_with_a_transparent_key_is_composited():
    image = png(PIL.Image.fromarray(np.array([[1000, 32896]], np.uint16)), transparency=1000)
    assert image.mode == "I;16" and pixels(image) == [grey(0, 128), grey(255, 128)]


# ---- anything else, and the whole list ------------------------------------------------------
def test_an_unknown_mode_is_refused_naming_it():
    image = PIL.Image.new("RGB", (1, 1))
    image._mode = "BGR;24"  # a mode older Pillows had; this one cannot make it
    with pytest.raises(ImageFormError, match=r"mode BGR;24: not a mode whose picture is known "
                                             r"here; convert it to RGB yourself"):
        rgb_versions(image)


def test_every_mode_pillow_has_is_converted_or_refused_by_name():
    known = {"RGB", "I", "F", *CONVERTED, *SIXTEEN_BIT, *ALPHA}
    assert known == set(PIL.Image.MODES)


# ---- canonical_image: one picture, or a refusal ------------------------------------------
def test_canonical_image_takes_every_mode_through_the_same_conversion():
    cases = [PIL.Image.frombytes("I;16", (5, 1), np.array(SIXTEEN_VALUES, "<u2").tobytes()),
             PIL.Image.fromarray(np.array([[[200, 255], [100, 255]]], np.uint8), "LA"),
             PIL.Image.frombytes("CMYK", (1, 1), bytes([100, 50, 0, 50]))]
    expected = [EIGHT_BIT, grey(200, 100), [[[125, 165, 205]]]]
    for image, answer in zip(cases, expected):
        out = canonical_image(image)
        assert out.dtype == np.uint8 and out.flags.writeable and out.tolist() == answer
        assert one_rgb(image).tolist() == answer


def test_canonical_image_refuses_a_translucent_image_telling_to_composite_it():
    image = PIL.Image.fromarray(np.array([[[200, 128], [100, 255]]], np.uint8), "LA")
    with pytest.raises(ImageFormError) as info:
        canonical_image(image)
    assert str(info.value).startswith("PIL image in mode LA with transparency (1 of 2 pixels not "
                                      "opaque): what it shows depends on the background")
    assert "composite it over its background" in str(info.value)
    with pytest.raises(ImageFormError, match="mode F"):
        canonical_image(PIL.Image.fromarray(np.zeros((2, 2), np.float32)))


# ---- pipeline.screen ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checker():
    return ConceptChecker.from_pretrained(CHECKER, device="cpu")


def screen_one(checker, path) -> dict:
    """``pipeline.screen``'s rows of one file, as {concept: row}."""
    rows = screen.screen_files(checker, [screen.Entry(str(path))])
    return {row["concept"]: row for row in rows}


def test_a_16_bit_png_is_screened_as_its_grey_picture_not_white(checker, tmp_path):
    rng = np.random.default_rng(0)
    picture = shapes.render(shapes.sample_scene(rng, character="zorbo"), rng)
    grey8 = np.asarray(PIL.Image.fromarray(picture).convert("L"))
    PIL.Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    with PIL.Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16" and int(np.asarray(image).max()) > 255
    frames, error = screen.read_frames(str(tmp_path / "deep.png"), 224, screen.MAX_PIXELS)
    expected = np.repeat(grey8[..., None], 3, axis=-1)
    assert error is None and len(frames) == 1
    assert np.array_equal(np.asarray(frames[0]), expected)  # PIL's convert("RGB"): all 255
    rows = screen_one(checker, tmp_path / "deep.png")
    scored = checker.check([expected]).p_unacceptable[0]
    white = checker.check([np.full_like(expected, 255)]).p_unacceptable[0]
    p = np.array([float(rows[name]["p_unacceptable"]) for name in checker.names])
    assert np.allclose(p, scored, atol=1e-5) and not np.allclose(p, white, atol=1e-2)
    assert all(rows[name]["frames"] == 1 and rows[name]["error"] == "" for name in checker.names)


def test_a_translucent_file_is_blocked_if_it_fires_over_black_or_over_white(checker, tmp_path):
    """A plain shape whose background is transparent: over white no concept fires, over black
    black_background does; the file is scored over both and blocked (fail closed)."""
    rng = np.random.default_rng(3)
    picture = shapes.render(shapes.sample_scene(rng, character_prob=0.0, background="white"),
                            rng)
    alpha = np.where(np.abs(picture.astype(int) - 240).max(-1) < 25, 0, 255).astype(np.uint8)
    PIL.Image.fromarray(np.dstack([picture, alpha]), "RGBA").save(tmp_path / "cutout.png")
    over_black, over_white = rgb_versions(PIL.Image.open(tmp_path / "cutout.png"))
    alone = checker.check([np.array(over_black), np.array(over_white)])
    fired = dict(zip(checker.names, alone.fired.T.tolist()))
    assert fired["black_background"] == [True, False] and not alone.fired[1].any()
    rows = screen_one(checker, tmp_path / "cutout.png")
    assert {r["frames"] for r in rows.values()} == {2} and rows["zorbo"]["blocked"]
    assert [name for name, row in rows.items() if row["fired"]] == ["black_background"]
    over_white.save(tmp_path / "on_white.png")  # the same picture, composited by its owner
    assert not any(row["blocked"] for row in screen_one(checker, tmp_path / "on_white.png")
                   .values())


def test_a_file_of_a_mode_of_unknown_range_is_blocked_with_its_reason(checker, tmp_path):
    PIL.Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(tmp_path / "float.tif")
    frames, error = screen.read_frames(str(tmp_path / "float.tif"), 224, screen.MAX_PIXELS)
    assert frames is None and error.startswith("PIL image in mode F (32-bit float)")
    rows = screen_one(checker, tmp_path / "float.tif")
    assert all(r["blocked"] and r["fired"] and r["frames"] == 0 and r["p_unacceptable"] == ""
               and r["error"] == error for r in rows.values())
