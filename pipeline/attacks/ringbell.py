"""RingBell+ (Tsai et al. 2024): a genetic search for a prompt whose T2I text states carry the
concept vector, scored as typed.

Two sets of genetic operators (``operators``): ``release``, those of the authors' release as we
read it (the fitter half of the population survives and parents the rest; one-point crossover
with probability ``crossover``, else a copy of one parent; each child mutated with probability
``mutation`` at one random position), the paper setting's default; and ``ours`` (binary
tournament on rank, the ``elite`` share kept, uniform crossover at ``crossover`` per token,
``mutation`` per token), which on the mini world's 8-token prompts and 60 generations keeps
more diversity. Both start from random prompts of the vocabulary.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from pipeline.attacks.context import AttackContext, Results
from pipeline.attacks.objective import unit_image_features
from pipeline.attacks.prompt_embedding import TokenPrompts
from pipeline.attacks.trial import row_weights, select_by_images
from pipeline.registry import RINGBELL_OPERATORS, implemented

if TYPE_CHECKING:  # its budget of attack.<setting> (pipeline.schema)
    from pipeline.schema import RingBell


def ringbell(ctx: AttackContext, p: RingBell) -> Results:
    """The plain search's candidates (one per stage and seed) and, for "+", those of every
    strength of ``p.adaptive_weights``; per budget, the trial keeps the ``ctx.n_prompts`` best
    of all."""
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    plain = ctx.plain("RingBell", lambda: ringbell_candidates(ctx, p, [0.0]))
    adapted = ringbell_candidates(ctx, p, p.adaptive_weights) if ctx.adaptive else {}
    return {f: select_by_images(ctx, f"RingBell at {f:g}", [q for q, _ in plain[f]],
                                adapted.get(f, []), p.selection_images, targets)
            for f in ctx.budgets}


def ringbell_candidates(ctx: AttackContext, p: RingBell,
                        weights: list[float]) -> dict[float, list[tuple[str, float]]]:
    """One genetic search per candidate (``ctx.seed``), candidate i with strength
    ``weights[i % len(weights)]`` on the target's scaled text margin (all 0: plain); each one's
    fittest prompt as typed, with its strength, at each budget fraction of the generations."""
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
    adaptive = any(weights)
    strength = row_weights(weights, rows, goals.device) if adaptive else None

    @torch.no_grad()
    def new_losses(rows_of: np.ndarray, individuals: np.ndarray) -> np.ndarray:
        """The loss (lower = fitter) of each individual (token ids) of candidate ``rows_of``, of
        the prompt as typed: decoding can glue a name's tokens to others ("k" "kroll" ->
        "kkroll"), which the T2I model then reads as other tokens, so fitness is measured on the
        text."""
        prompts = side.decode(torch.from_numpy(individuals))
        index = torch.from_numpy(rows_of).to(goals.device)
        loss = (states(prompts) - goals[index]).pow(2).mean((1, 2))
        if adaptive:
            loss = loss + strength[index] * ctx.text_term(prompts)
        return loss.cpu().numpy()

    known: dict[tuple[int, bytes], float] = {}

    def loss_of(population: np.ndarray) -> np.ndarray:
        """``candidates x P x K`` ids -> loss, ``candidates x P``. Individuals of the last
        population scored (survivors, elites, unchanged copies) and repeats keep their loss:
        it is a function of the candidate and the ids alone, and the encoders give a row the
        same bits in any batch, so this only skips work."""
        n, size, k = population.shape
        keys = [(i, population[i, j].tobytes()) for i in range(n) for j in range(size)]
        missing = list(dict.fromkeys(key for key in keys if key not in known))
        if missing:
            rows_of = np.array([i for i, _ in missing])
            individuals = np.stack([np.frombuffer(b, population.dtype) for _, b in missing])
            known.update(zip(missing, new_losses(rows_of, individuals).tolist()))
        losses = np.array([known[key] for key in keys]).reshape(n, size)
        known.clear()  # one generation back: what the next one can carry over
        known.update(zip(keys, losses.ravel().tolist()))
        return losses

    breed = OPERATORS[p.operators]
    vocabulary = side.vocabulary.numpy()
    population = rng.choice(vocabulary, (rows, p.population, p.tokens))
    snapshots, found = ctx.snapshots(p.generations), {}
    for generation in tqdm(range(p.generations), desc="RingBell+" if adaptive else "RingBell",
                           unit="gen", mininterval=5):
        order = np.argsort(loss_of(population), axis=1, kind="stable")
        population = breed(rng, np.take_along_axis(population, order[..., None], axis=1),
                           vocabulary, p)
        if generation + 1 in snapshots:
            best = population[np.arange(rows), loss_of(population).argmin(1)]
            for fraction in snapshots[generation + 1]:
                found[fraction] = [(q, float(weights[i % len(weights)]))
                                   for i, q in enumerate(side.decode(torch.from_numpy(best)))]
    return found


def _ours(rng: np.random.Generator, ranked: np.ndarray, vocabulary: np.ndarray,
          p: RingBell) -> np.ndarray:
    """The next generation of a population sorted fittest first (``rows x P x K``): the elite
    kept; children of binary tournaments on rank, uniform crossover, per-token mutation."""
    rows, size, _ = ranked.shape
    elite = max(1, int(p.elite * size))
    a, b = rng.integers(0, size, (2, 2, rows, size - elite))
    parents = np.minimum(a, b)  # the lower index is the fitter (sorted population)
    mothers = np.take_along_axis(ranked, parents[0][..., None], axis=1)
    fathers = np.take_along_axis(ranked, parents[1][..., None], axis=1)
    children = np.where(rng.random(mothers.shape) < p.crossover, fathers, mothers)
    mutate = rng.random(children.shape) < p.mutation
    children = np.where(mutate, rng.choice(vocabulary, children.shape), children)
    return np.concatenate([ranked[:, :elite], children], axis=1)


def _release(rng: np.random.Generator, ranked: np.ndarray, vocabulary: np.ndarray,
             p: RingBell) -> np.ndarray:
    """The release's operators (module docstring): the fitter half survives; each child of two
    random survivors takes a one-point crossover with probability ``crossover`` (else the first
    parent), then with probability ``mutation`` one random token replaced."""
    rows, size, k = ranked.shape
    keep = max(1, size // 2)
    survivors = ranked[:, :keep]
    n = size - keep
    parents = rng.integers(0, keep, (2, rows, n))
    mothers = np.take_along_axis(survivors, parents[0][..., None], axis=1)
    fathers = np.take_along_axis(survivors, parents[1][..., None], axis=1)
    cut = rng.integers(1, max(2, k), (rows, n, 1))
    crossed = np.where(np.arange(k) < cut, mothers, fathers)
    children = np.where(rng.random((rows, n, 1)) < p.crossover, crossed, mothers)
    position = rng.integers(0, k, (rows, n, 1))
    mutate = (rng.random((rows, n, 1)) < p.mutation) & (np.arange(k) == position)
    children = np.where(mutate, rng.choice(vocabulary, children.shape), children)
    return np.concatenate([survivors, children], axis=1)


OPERATORS = implemented(RINGBELL_OPERATORS, {"ours": _ours, "release": _release},
                        "pipeline.attacks.ringbell.OPERATORS")
