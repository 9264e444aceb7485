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
    memo: dict = field(default_factory=dict)  # candidates of plain searches, shared by the runs
                                              # of one stage (see ``plain_candidates``)

    @property
    def adaptive(self) -> bool:
        """A "+" run: adapted to ``target``."""
        return self.target is not None

    def plain_candidates(self, search: str, make: Callable[[], list[str]]) -> list[str]:
        """The candidates of a plain (filter-free) text-space search, made once per stage: they
        depend on the CLIP text side, the targets and the seed, never on the UNet, so the runs
        against each edited model (fine-tuning CRTs) share the plain run's, and only their trial
        (rendered by the model under attack) differs."""
        key = (search, self.seed)
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


@dataclass
class AttackResult:
    prompts: list[str]
    objective: list[float]                             # final loss per prompt (lower = better)
    trial_success: list[float]                         # share of its trial images that succeeded
    adaptive_weight: float                             # the "+" term's weight (CCE+: the one kept)
    textual_inversion: dict[str, torch.Tensor] = field(default_factory=dict)  # token -> vector

