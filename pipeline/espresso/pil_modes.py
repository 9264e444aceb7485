"""Every PIL image mode to the RGB picture it shows, or refused with its reason: the one conversion
of PIL images, shared by :func:`pipeline.espresso.filter.canonical_image` (PIL inputs of the
filter and the checker) and ``pipeline.screen`` (image files). PIL's own ``convert("RGB")``
is not it: it clips a 16-bit image to white and drops alpha whatever it hides.

What each mode becomes is :func:`rgb_versions`'s docstring (METHOD section 2, "Inputs").

A refusal is an :class:`~pipeline.espresso.filter.ImageFormError` (the message names the mode,
why, and the fix): ``screen`` blocks the image unscored, ``embed`` raises, ``pipeline.screen``
blocks the file with the reason in its ``error`` column.
"""
from __future__ import annotations

import numpy as np
import PIL.Image

from pipeline.espresso.filter import ImageFormError

#: Modes that PIL's ``convert("RGB")`` turns into the RGB picture they show.
CONVERTED = ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
#: 16-bit grey in its byte orders.
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
#: Modes with an alpha channel, and the modes with premultiplied alpha among them.
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
PREMULTIPLIED = ("RGBa", "La")
#: The backgrounds a translucent image is composited over, in the order of its versions.
BACKGROUNDS = (("black", 0), ("white", 255))


def rgb_versions(image: PIL.Image.Image) -> list[PIL.Image.Image]:
    """The RGB picture(s) ``image`` shows, as new images (``image`` is not changed): one, or
    for an image with translucent pixels two. Raises :class:`ImageFormError` naming the mode,
    why and the fix where there is no picture to give. Mode by mode:

    - ``RGB``: as is.
    - ``1``, ``L``, ``P`` (without transparency), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``,
      ``RGBX`` (RGB with a padding byte): PIL's ``convert("RGB")``.
    - ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit grey): each value ``v`` to the 8-bit
      grey ``round(v / 257)`` (65535 -> 255, 32896 -> 128): the 16-bit range onto the 8-bit one.
    - ``I`` (32-bit integer): the same if every value lies in 0..65535 (a 16-bit image, as PIL
      opens some); else refused, its range being unknown.
    - ``F`` (32-bit float): refused, its range being unknown (give a uint8 image, or a float
      array in [0, 1]).
    - Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent palette entry,
      ``L``/``RGB``/16-bit grey with a transparent colour key; premultiplied ``RGBa``, ``La``):
      fully opaque, the alpha is dropped. Otherwise the picture depends on the page behind it,
      so there are two versions: composited over black and over white, each rounded to the
      nearest value. ``pipeline.screen`` scores both and blocks the image if either fires (fail
      closed); :func:`one_rgb` (``canonical_image``), which gives one image, refuses it,
      telling the caller to composite it over its background.
    - Any other mode: refused, naming it and the fix.
    """
    color, alpha, premultiplied = _color_and_alpha(image)
    if not _translucent(alpha):
        return [PIL.Image.fromarray(np.ascontiguousarray(color))]
    return [PIL.Image.fromarray(_composite(color, alpha, premultiplied, value))
            for _, value in BACKGROUNDS]


def one_rgb(image: PIL.Image.Image) -> np.ndarray:
    """uint8 ``H x W x 3``: the one RGB picture ``image`` shows, as :func:`rgb_versions`
    converts it; an image with translucent pixels shows none without a background, and raises
    :class:`ImageFormError` telling the caller to composite it."""
    color, alpha, _ = _color_and_alpha(image)
    if _translucent(alpha):
        raise ImageFormError(
            f"PIL image in mode {image.mode} with transparency ({int((alpha < 255).sum())} of "
            f"{alpha.size} pixels not opaque): what it shows depends on the background behind "
            "it; composite it over its background (e.g. Image.alpha_composite onto an RGBA "
            "background, then convert('RGB')) and pass the result (pipeline.screen scores such "
            "a file over black and over white)")
    return np.require(color, np.uint8, ["C", "W"])  # a copy only where PIL's is read-only


def _translucent(alpha: np.ndarray | None) -> bool:
    """Whether some pixel is not fully opaque (an alpha of 255 everywhere is dropped)."""
    return alpha is not None and not bool((alpha == 255).all())


def _color_and_alpha(image: PIL.Image.Image) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(uint8 ``H x W x 3`` colour, uint8 ``H x W`` alpha or None, whether the colour is
    premultiplied by the alpha)."""
    mode, key = image.mode, image.info.get("transparency")
    if mode in SIXTEEN_BIT or mode == "I":
        values = np.asarray(image)
        if mode == "I":
            _check_16_bit(values)
        values = values.astype(np.int32)  # native byte order; (v + 128) fits
        grey = ((values + 128) // 257).astype(np.uint8)  # round(v / 257); v / 257 is never x.5
        alpha = (None if not isinstance(key, int)
                 else np.where(values == key, 0, 255).astype(np.uint8))
        return np.repeat(grey[..., None], 3, axis=-1), alpha, False
    if mode == "F":
        raise ImageFormError("PIL image in mode F (32-bit float): its value range is unknown, so "
                             "it is not guessed at; give a uint8 image, or a float array scaled "
                             "to [0, 1]")
    if mode in PREMULTIPLIED:
        values = np.asarray(image)
        color = values[..., :3] if mode == "RGBa" else np.repeat(values[..., :1], 3, axis=-1)
        return color, values[..., -1], True
    if mode in ALPHA or (mode in CONVERTED + ("RGB",) and _transparent(image)):
        rgba = np.asarray(image.convert("RGBA"))  # PIL applies a palette's or a key's alpha
        return rgba[..., :3], rgba[..., 3], False
    if mode == "RGB":
        return np.array(image), None, False
    if mode in CONVERTED:
        return np.asarray(image.convert("RGB")), None, False
    raise ImageFormError(f"PIL image in mode {mode}: not a mode whose picture is known here; "
                         "convert it to RGB yourself, or give a uint8 H x W x 3 array")


def _transparent(image: PIL.Image.Image) -> bool:
    """Whether a mode without an alpha channel has one anyway: a transparent colour key or
    palette entry, or a palette with alpha."""
    palette = image.palette if image.mode == "P" else None
    return "transparency" in image.info or (palette is not None and palette.mode == "RGBA")


def _check_16_bit(values: np.ndarray) -> None:
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 65535:
        raise ImageFormError(f"PIL image in mode I (32-bit integer) with values {low}..{high}, "
                             "outside 0..65535: its value range is unknown, so it is not guessed "
                             "at; give a uint8 image, or a float array scaled to [0, 1]")


def _composite(color: np.ndarray, alpha: np.ndarray, premultiplied: bool,
               background: int) -> np.ndarray:
    """uint8 ``color`` over a uniform ``background`` (0 or 255) through ``alpha``, rounded to
    the nearest value: ``round((c * a + b * (255 - a)) / 255)``; premultiplied colour is already
    ``c * a / 255``, so it is ``c + b * (255 - a) / 255``."""
    c, a = color.astype(np.int32), alpha.astype(np.int32)[..., None]
    if premultiplied:
        out = c + background * (255 - a) // 255
    else:
        out = (c * a + background * (255 - a) + 127) // 255  # never x.5: c * a is an integer
    return np.clip(out, 0, 255).astype(np.uint8)
