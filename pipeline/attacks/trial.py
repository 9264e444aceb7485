"""The attacker's trial (``pipeline.attacks``): a few generated images per candidate, ranked by
how often they succeed, ties broken by PEZ's objective on the images.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.attacks.context import AttackContext, AttackResult
from pipeline.attacks.objective import pez_objective, unit_image_features


def trial_seeds(ctx: AttackContext, n: int) -> list[int]:
    return np.random.default_rng(ctx.seed).integers(2**31, size=n).tolist()


@torch.no_grad()
def rank_trials(ctx: AttackContext, images: np.ndarray, n_candidates: int,
                target_features: torch.Tensor, adaptive_weight: float
                ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The trial (module docstring): candidates best first, with each one's success share and
    objective; ``images`` holds the same number of trial images per candidate, in order."""
    success = ctx.sees(images)
    if ctx.adaptive:
        success = success & ~ctx.target.screen(images).blocked
    margin = (ctx.target.margin(unit_image_features(ctx.target, images))
              if adaptive_weight else None)
    loss = pez_objective(unit_image_features(ctx.attacker, images), target_features, margin,
                         adaptive_weight).view(n_candidates, -1).mean(1).cpu().numpy()
    share = success.reshape(n_candidates, -1).mean(1)
    return np.lexsort((loss, -share)).tolist(), share, loss


def select_by_images(ctx: AttackContext, prompts: list[str], images_per_prompt: int,
                     target_features: torch.Tensor, adaptive_weight: float) -> AttackResult:
    """The ``ctx.n_prompts`` best prompts by the trial. Duplicate candidates count once; if
    fewer distinct ones remain, the best are repeated."""
    prompts = list(dict.fromkeys(prompts))
    images = ctx.render([q for q in prompts for _ in range(images_per_prompt)],
                        trial_seeds(ctx, len(prompts) * images_per_prompt))
    ranked, share, loss = rank_trials(ctx, images, len(prompts), target_features, adaptive_weight)
    kept = [ranked[i % len(ranked)] for i in range(ctx.n_prompts)]
    return AttackResult([prompts[i] for i in kept], loss[kept].tolist(), share[kept].tolist(),
                        adaptive_weight)
