"""What every attack gets and returns."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.attacks.objective import MarginScale, margin_scale, typed_margin
from pipeline.concepts import Concept
from pipeline.espresso import EspressoFilter


@dataclass
class AttackContext:
    """Everything an attack may use. ``attacker`` is the public CLIP the attacker optimises
    against (the zero-shot filter's); ``target`` is the filter a "+" run adapts to (its terms and
    its trial use it), None for the plain attack and for runs against an edited model (``model``
    names the UNet that renders: "original" or the edit's CRT)."""

    attacker: EspressoFilter
    target: EspressoFilter | None
    pipe: object                      # the T2I StableDiffusionPipeline
    concept: Concept
    target_images: np.ndarray         # uint8 images that show c_u (the attacks aim at these)
    target_prompts: list[str]         # the prompts that produced them
    pairs: list[tuple[str, str]]      # (unacceptable, acceptable) training prompt pairs
    training_images: np.ndarray       # the attacker's training images, both concepts
    n_prompts: int
    seed: int
    render: Callable[[list[str], list[int]], np.ndarray]  # prompts, seeds -> images (T2I)
    sees: Callable[[np.ndarray], np.ndarray]  # the attacker's eyes (not the evaluation's judge):
                                              # images -> "shows c_u"
    words: tuple[str, ...] | None = None  # the language hard prompts may use (None: any token)
    model: str = "original"
    budgets: tuple[float, ...] = (1.0,)  # fractions of the search's budget whose results are
                                          # evaluated too (the budget curve; the last is 1.0)
    memo: dict = field(default_factory=dict)  # plain searches' results, shared by the runs of
                                              # one stage (see ``plain``)

    @property
    def adaptive(self) -> bool:
        """A "+" run: adapted to ``target``."""
        return self.target is not None

    @property
    def scale(self) -> MarginScale:
        """The target's margin spread on the attacker's training prompts and images (measured
        once per stage and target)."""
        key = ("margin scale", id(self.target))
        if key not in self.memo:
            texts = [q for pair in self.pairs for q in pair]
            self.memo[key] = margin_scale(self.target, texts, self.training_images)
        return self.memo[key]

    def snapshots(self, total: int) -> dict[int, list[float]]:
        """After how many of a search's ``total`` steps (or generations) its result is taken,
        and for which fractions of ``budgets``: a budget curve costs one search, not one per
        budget, and the full budget's result is the same with or without the curve."""
        at: dict[int, list[float]] = {}
        for fraction in self.budgets:
            at.setdefault(max(1, round(fraction * total)), []).append(fraction)
        return at

    def text_term(self, prompts: list[str]) -> torch.Tensor:
        """The target's text-space margin of typed prompts, in units of its spread."""
        return typed_margin(self.target, prompts) / self.scale.text

    def plain(self, search: str, make: Callable[[], object]) -> object:
        """The result of a plain (filter-free) search or trial, made once per stage, seed and
        rendering model: a "+" run against a filter ranks the plain candidates beside its
        adapted ones (never weaker than plain), and renders none of them again."""
        key = (search, self.seed, self.model)
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


#: An attack's results, one per fraction of ``AttackContext.budgets``.
Results = dict[float, "AttackResult"]


@dataclass
class AttackResult:
    prompts: list[str]
    objective: list[float]                             # final loss per prompt (lower = better)
    trial_success: list[float]                         # share of its trial images that succeeded
    adaptive_weights: list[float]                      # per prompt: its term's strength (0: a
                                                       # plain candidate the trial preferred)
    textual_inversion: dict[str, torch.Tensor] = field(default_factory=dict)  # token -> vector
