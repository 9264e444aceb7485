"""RingBell+ (Tsai et al. 2024): a genetic search for a prompt whose T2I text states carry the
concept vector, scored as typed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from pipeline.attacks.context import AttackContext, AttackResult
from pipeline.attacks.objective import typed_margin, unit_image_features
from pipeline.attacks.prompt_embedding import TokenPrompts
from pipeline.attacks.trial import select_by_images

if TYPE_CHECKING:  # its budget of attack.<setting> (pipeline.schema)
    from pipeline.schema import RingBell


def ringbell(ctx: AttackContext, p: RingBell) -> AttackResult:
    """The search's candidates, of which the trial keeps the ``ctx.n_prompts`` best."""
    weight = p.adaptive_weight if ctx.adaptive else 0.0
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    candidates = (ringbell_candidates(ctx, p, weight) if weight else
                  ctx.plain_candidates("RingBell", lambda: ringbell_candidates(ctx, p, 0.0)))
    return select_by_images(ctx, candidates, p.selection_images, targets, weight)


def ringbell_candidates(ctx: AttackContext, p: RingBell, weight: float) -> list[str]:
    """One genetic search per candidate (``ctx.seed``), each one's fittest prompt as typed;
    ``weight`` > 0 (the filter term) needs ``ctx.target``."""
    pipe, rng = ctx.pipe, np.random.default_rng(ctx.seed)
    side = TokenPrompts(pipe.text_encoder, pipe.tokenizer, ctx.words)

    @torch.no_grad()
    def states(prompts: list[str]) -> torch.Tensor:
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=pipe.tokenizer.model_max_length).input_ids
        return pipe.text_encoder(ids.to(pipe.text_encoder.device)).last_hidden_state.float()

    unacceptable, acceptable = zip(*ctx.pairs)
    concept_vector = (states(list(unacceptable)) - states(list(acceptable))).mean(0)
    rows = p.candidates
    bases = [acceptable[i % len(acceptable)] for i in range(rows)]
    goals = states(bases) + p.eta * concept_vector

    @torch.no_grad()
    def loss_of(population: np.ndarray) -> np.ndarray:
        """``candidates x P x K`` candidate ids -> loss (lower = fitter), ``candidates x P``, of the
        prompts as typed: decoding can glue a name's tokens to others ("k" "kroll" -> "kkroll"),
        which the T2I model then reads as other tokens, so fitness is measured on the text."""
        n, size, k = population.shape
        prompts = side.decode(torch.from_numpy(population.reshape(n * size, k)))
        loss = (states(prompts) - goals.repeat_interleave(size, 0)).pow(2).mean((1, 2))
        if weight:
            loss = loss + weight * typed_margin(ctx.target, prompts)
        return loss.view(n, size).cpu().numpy()

    vocabulary = side.vocabulary.numpy()
    size, k = p.population, p.tokens
    population = rng.choice(vocabulary, (rows, size, k))
    elite = max(1, int(p.elite * size))
    for _ in tqdm(range(p.generations), desc="RingBell+" if weight else "RingBell",
                  unit="gen", mininterval=5):
        loss = loss_of(population)
        order = np.argsort(loss, axis=1, kind="stable")
        population = np.take_along_axis(population, order[..., None], axis=1)
        parents = _tournament(rng, rows, size, size - elite)
        mothers = np.take_along_axis(population, parents[0][..., None], axis=1)
        fathers = np.take_along_axis(population, parents[1][..., None], axis=1)
        cross = rng.random(mothers.shape) < p.crossover
        children = np.where(cross, fathers, mothers)
        mutate = rng.random(children.shape) < p.mutation
        children = np.where(mutate, rng.choice(vocabulary, children.shape), children)
        population = np.concatenate([population[:, :elite], children], axis=1)
    best = population[np.arange(rows), loss_of(population).argmin(1)]
    return side.decode(torch.from_numpy(best))


def _tournament(rng: np.random.Generator, rows: int, size: int, n: int) -> np.ndarray:
    """Indices of two parents for each of ``n`` children per row, by binary tournament on rank
    (the population is sorted by loss): ``2 x rows x n``."""
    a, b = rng.integers(0, size, (2, 2, rows, n))
    return np.minimum(a, b)  # the lower index is the fitter (sorted population)
