"""What every attack gets and returns."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.concepts import Concept
from pipeline.espresso import EspressoFilter


@dataclass
class AttackContext:
    """Everything an attack may use. ``attacker`` is the public CLIP the attacker optimises
    against (the zero-shot filter's); ``target`` is the filter a "+" run adapts to (its terms and
    its trial use it), None for the plain attack."""

    attacker: EspressoFilter
    target: EspressoFilter | None
    pipe: object                      # the T2I StableDiffusionPipeline
    concept: Concept
    target_images: np.ndarray         # uint8 images that show c_u (the attacks aim at these)
    target_prompts: list[str]         # the prompts that produced them
    pairs: list[tuple[str, str]]      # (unacceptable, acceptable) training prompt pairs
    n_prompts: int
    seed: int
    render: Callable[[list[str], list[int]], np.ndarray]  # prompts, seeds -> images (T2I)
    sees: Callable[[np.ndarray], np.ndarray]  # the attacker's eyes (not the evaluation's judge):
                                              # images -> "shows c_u"
    words: tuple[str, ...] | None = None  # the language hard prompts may use (None: any token)

    @property
    def adaptive(self) -> bool:
        """A "+" run: adapted to ``target``."""
        return self.target is not None


@dataclass
class AttackResult:
    prompts: list[str]
    objective: list[float]                             # final loss per prompt (lower = better)
    trial_success: list[float]                         # share of its trial images that succeeded
    adaptive_weight: float                             # the "+" term's weight (CCE+: the one kept)
    textual_inversion: dict[str, torch.Tensor] = field(default_factory=dict)  # token -> vector

