"""The attacker's trial (``pipeline.attacks``): a few generated images per candidate, ranked by
how often they succeed, ties broken by how close the images are to the targets (PEZ's objective
on images, without any filter term, so that candidates of different strengths compare).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pipeline.attacks.context import AttackContext, AttackResult
from pipeline.attacks.objective import pez_objective, unit_image_features
from pipeline.attacks.prompt_embedding import textual_inversion


def trial_seeds(ctx: AttackContext, n: int, stream: int = 0) -> list[int]:
    """``n`` trial seeds of the run's seed: stream 0 for plain candidates, 1 for adapted ones
    (drawn independently of the evaluation's seeds)."""
    return np.random.default_rng([ctx.seed, stream]).integers(2**31, size=n).tolist()


@torch.no_grad()
def rank_trials(ctx: AttackContext, images: np.ndarray, n_candidates: int,
                target_features: torch.Tensor) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The trial (module docstring): candidates best first, with each one's success share and
    objective; ``images`` holds the same number of trial images per candidate, in order."""
    success = ctx.sees(images)
    if ctx.adaptive:
        success = success & ~ctx.target.screen(images).blocked
    loss = pez_objective(unit_image_features(ctx.attacker, images), target_features)
    loss = loss.view(n_candidates, -1).mean(1).cpu().numpy()
    share = success.reshape(n_candidates, -1).mean(1)
    return np.lexsort((loss, -share)).tolist(), share, loss


def trial_images(ctx: AttackContext, prompts: list[str], images_per_prompt: int,
                 stream: int) -> np.ndarray:
    return ctx.render([q for q in prompts for _ in range(images_per_prompt)],
                      trial_seeds(ctx, len(prompts) * images_per_prompt, stream))


def select_by_images(ctx: AttackContext, search: str, plain: list[str],
                     adapted: list[tuple[str, float]], images_per_prompt: int,
                     target_features: torch.Tensor) -> AttackResult:
    """The ``ctx.n_prompts`` best of the plain candidates and the adapted ones (prompt, strength)
    by the trial: a "+" run is the attacker's pick among plain and every strength, so it is
    never weaker than plain by the attacker's own measure. The plain candidates' trial images
    are rendered once per stage (``ctx.plain``). Duplicates count once (the first: plain); if
    fewer distinct candidates remain, the best are repeated."""
    plain = list(dict.fromkeys(plain))
    images = ctx.plain(f"{search} trial",
                       lambda: trial_images(ctx, plain, images_per_prompt, stream=0))
    strength = dict.fromkeys(plain, 0.0)
    extra = {}
    for prompt, weight in adapted:
        if prompt not in strength and prompt not in extra:
            extra[prompt] = weight
    if extra:
        images = np.concatenate([images, trial_images(ctx, list(extra), images_per_prompt,
                                                      stream=1)])
    strength.update(extra)
    prompts = list(strength)
    ranked, share, loss = rank_trials(ctx, images, len(prompts), target_features)
    kept = [ranked[i % len(ranked)] for i in range(ctx.n_prompts)]
    return AttackResult([prompts[i] for i in kept], loss[kept].tolist(), share[kept].tolist(),
                        [strength[prompts[i]] for i in kept])


def pick_result(ctx: AttackContext, results: list[AttackResult], images: int,
                target_features: torch.Tensor) -> AttackResult:
    """The attacker's pick among whole results (each its prompts and its own textual inversion)
    by ``images`` trial images each, rendered by ``ctx.render`` (the model under attack) from
    trial seeds of their own (stream 2): an attack adapted to an edited model is its pick between
    the search through the edit and the plain run's prompts, so never weaker than the plain
    condition by its own eyes. The pick's ``trial_success`` is this trial's share."""
    seeds = trial_seeds(ctx, images, stream=2)
    rendered = []
    for result in results:
        prompts = [result.prompts[i % len(result.prompts)] for i in range(images)]
        with textual_inversion(ctx.pipe, result.textual_inversion):
            rendered.append(ctx.render(prompts, seeds))
    ranked, share, _ = rank_trials(ctx, np.concatenate(rendered), len(results), target_features)
    best = results[ranked[0]]
    return dataclasses.replace(best, trial_success=[float(share[ranked[0]])] * len(best.prompts))


def row_weights(weights: list[float], rows: int, device) -> torch.Tensor:
    """Each of ``rows`` independent searches gets a strength of ``weights`` in turn, so one
    batched search covers the whole grid at the cost of one."""
    return torch.tensor([weights[i % len(weights)] for i in range(rows)], device=device)
