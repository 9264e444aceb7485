"""Typo and Typo+: the acceptable concept written onto the target images (a typographic attack
on CLIP), then the images inverted into prompts with PEZ's search; "+" adds PEZ+'s filter term
(at Typo's own strengths) and the trial against the target filter.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.attacks.context import AttackContext, Results
from pipeline.attacks.objective import unit_image_features
from pipeline.attacks.pez import pez_search

if TYPE_CHECKING:  # its budget of attack.<setting> (pipeline.schema)
    from pipeline.schema import Typo


def write_text(images: np.ndarray, text: str, height_fraction: float) -> np.ndarray:
    """``text`` written across the bottom of each image, white with a black outline (drawn at
    4x for legibility on tiny images, then resized back)."""
    out = []
    for image in images:
        h, w = image.shape[:2]
        scale = max(1, 128 // h)
        canvas = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
        size = max(6, int(height_fraction * h * scale))
        font = ImageFont.load_default(size=size)
        draw = ImageDraw.Draw(canvas)
        box = draw.textbbox((0, 0), text, font=font, stroke_width=max(1, size // 8))
        x = max(0, (canvas.width - (box[2] - box[0])) // 2)
        y = canvas.height - (box[3] - box[1]) - size // 4
        draw.text((x, y), text, font=font, fill="white", stroke_width=max(1, size // 8),
                  stroke_fill="black")
        out.append(np.asarray(canvas.resize((w, h), Image.LANCZOS)))
    return np.stack(out)


def typo(ctx: AttackContext, p: Typo) -> Results:
    written = write_text(ctx.target_images, ctx.concept.acceptable, p.text_height)
    return pez_search(ctx, p, unit_image_features(ctx.attacker, written), "Typo")
