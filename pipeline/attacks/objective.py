"""What the attacks measure, shared: unit image features, PEZ's objective, and the target
filter's margin, in units of its own spread.

Scale-free adaptation: filters put their margins on very different scales (on the mini world
the probe's text margin spreads 60 times wider than zero-shot Espresso's), so a fixed weight on
``margin`` is a gentle nudge against one target and a pull that stops the attack drawing the
concept against another. The attacker therefore measures each target's margin spread on its
own training data (:func:`margin_scale`: the train split's prompts and images, never the judge
or the test split) and every adaptive term uses ``margin / spread``: multiplying a target's
logits by any factor leaves the attack unchanged, and ``adaptive_weights`` are strengths in
units of that spread.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.espresso import EspressoFilter, text_embeddings


def unit_image_features(filt: EspressoFilter, images: np.ndarray) -> torch.Tensor:
    return F.normalize(filt.embed(images), dim=-1)


@torch.no_grad()
def typed_margin(filt: EspressoFilter, prompts: list[str]) -> torch.Tensor:
    """The filter's text-space margin ``<phi_p^filter(prompt), t_u - t_a>`` of typed prompts."""
    return filt.margin(text_embeddings(filt.clip, filt.tokenizer, prompts))


@dataclass(frozen=True)
class MarginScale:
    """A target filter's margin spread (standard deviation) over the attacker's training data:
    on prompts (the text-space terms of PEZ+, Typo+, RingBell+) and on images (CCE+)."""

    text: float
    image: float


@torch.no_grad()
def margin_scale(filt: EspressoFilter, prompts: list[str], images: np.ndarray) -> MarginScale:
    """``filt``'s margin spread on the attacker's training ``prompts`` and ``images``; a target
    whose margin does not vary there cannot be adapted to (a ValueError saying so)."""
    text = float(typed_margin(filt, prompts).double().std())
    image = float(filt.margin(unit_image_features(filt, images)).double().std())
    for what, value in (("prompts", text), ("images", image)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"the target filter's margin does not vary over the attacker's "
                             f"{len(prompts) if what == 'prompts' else len(images)} training "
                             f"{what} (spread {value:g}): a '+' attack has no scale to adapt "
                             "with; give the attack more training prompts (generate.prompts.train)")
    return MarginScale(text, image)


def pez_objective(features: torch.Tensor, target_features: torch.Tensor,
                  margin: torch.Tensor | None = None,
                  weights: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per prompt: 1 - mean cosine to the target images, plus its adaptive weight times the
    filter's scaled text-space margin (PEZ+; ``weights`` one per prompt, or one for all)."""
    loss = 1 - (features @ target_features.T).mean(-1)
    return loss if margin is None else loss + weights * margin
