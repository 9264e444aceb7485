"""What the attacks measure, shared: unit image features, PEZ's objective, and the target
filter's margin on prompts as typed.
"""
from __future__ import annotations

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


def pez_objective(features: torch.Tensor, target_features: torch.Tensor,
                  margin: torch.Tensor | None, adaptive_weight: float) -> torch.Tensor:
    """Per prompt: 1 - mean cosine to the target images, plus the adaptive weight times the
    filter's text-space margin (PEZ+)."""
    loss = 1 - (features @ target_features.T).mean(-1)
    return loss + adaptive_weight * margin if adaptive_weight else loss
