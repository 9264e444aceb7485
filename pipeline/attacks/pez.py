"""PEZ+ (Wen et al. 2023): hard prompts optimised as projected soft embeddings. Its search,
:func:`pez_search`, is also Typo's (plain and "+").
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from pipeline.attacks.context import AttackContext, Results
from pipeline.attacks.objective import pez_objective, unit_image_features
from pipeline.attacks.prompt_embedding import TokenPrompts, clip_text_features
from pipeline.attacks.trial import row_weights, select_by_images
from pipeline.espresso import EspressoFilter, text_embeddings

if TYPE_CHECKING:  # its budget of attack.<setting> (pipeline.schema)
    from pipeline.schema import Pez, Typo


def filter_margin(filt: EspressoFilter, side: TokenPrompts, values: torch.Tensor) -> torch.Tensor:
    """``<phi_p^filter(prompt), t_u - t_a>`` per prompt: > 0 means the filter's text side puts
    the prompt nearer c_u. ``side`` wraps ``filt.clip.text_model``."""
    return filt.margin(clip_text_features(filt.clip, side, values))


@torch.no_grad()
def typed_loss(ctx: AttackContext, prompts: list[str], target_features: torch.Tensor,
               weights: torch.Tensor | None) -> torch.Tensor:
    """PEZ's loss on the prompts as a user types them (decoded, re-tokenised, truncated):
    decoding a hard prompt can merge or split tokens, so the best prompt is chosen on the text
    that will actually be used, not on the ids optimised."""
    features = text_embeddings(ctx.attacker.clip, ctx.attacker.tokenizer, prompts)
    margin = ctx.text_term(prompts) if weights is not None else None
    return pez_objective(features, target_features, margin, weights)


def pez_candidates(ctx: AttackContext, p: Pez | Typo, target_features: torch.Tensor,
                   weights: list[float], desc: str) -> dict[float, list[tuple[str, float]]]:
    """PEZ from ``p.candidates`` random starts at once (``ctx.seed``), start i with strength
    ``weights[i % len(weights)]`` (all 0: plain, else ``ctx.target`` is needed); per start, the
    prompt with the best loss as typed so far, with its strength, at each budget fraction."""
    generator = torch.Generator().manual_seed(ctx.seed)
    attacker = TokenPrompts(ctx.attacker.clip.text_model, ctx.attacker.tokenizer, ctx.words)
    adaptive = any(weights)
    filter_side = (TokenPrompts(ctx.target.clip.text_model, ctx.target.tokenizer)
                   if adaptive else None)
    device = attacker.table.device
    strength = row_weights(weights, p.candidates, device) if adaptive else None
    start = attacker.vocabulary[torch.randint(len(attacker.vocabulary),
                                              (p.candidates, p.tokens), generator=generator)]
    start = start.to(device)
    soft = attacker.table[start].detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([soft], lr=p.lr, weight_decay=p.weight_decay)
    best_loss = torch.full((p.candidates,), float("inf"), device=device)
    best_ids = start.clone()
    snapshots, found = ctx.snapshots(p.steps), {}
    for step in tqdm(range(p.steps), desc=desc, unit="step", mininterval=5):
        ids = attacker.project(soft.detach())
        features = clip_text_features(ctx.attacker.clip, attacker, attacker.embed(ids, soft))
        margin = (filter_margin(ctx.target, filter_side, filter_side.embed(ids, soft))
                  / ctx.scale.text if adaptive else None)
        loss = pez_objective(features, target_features, margin, strength)
        typed = typed_loss(ctx, attacker.decode(ids), target_features, strength)
        better = typed < best_loss
        best_loss[better], best_ids[better] = typed[better], ids[better]
        for fraction in snapshots.get(step + 1, []):
            found[fraction] = [(q, float(weights[i % len(weights)]))
                               for i, q in enumerate(attacker.decode(best_ids))]
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
    return found


def pez_search(ctx: AttackContext, p: Pez | Typo, target_features: torch.Tensor,
               desc: str) -> Results:
    """The plain candidates (one search per stage and seed), and for "+" the candidates of every
    strength of ``p.adaptive_weights``; per budget, the trial keeps the ``ctx.n_prompts`` best
    of all."""
    plain = ctx.plain(desc, lambda: pez_candidates(ctx, p, target_features, [0.0], desc))
    adapted = (pez_candidates(ctx, p, target_features, p.adaptive_weights, desc + "+")
               if ctx.adaptive else {})
    return {f: select_by_images(ctx, f"{desc} at {f:g}", [q for q, _ in plain[f]],
                                adapted.get(f, []), p.selection_images, target_features)
            for f in ctx.budgets}


def pez(ctx: AttackContext, p: Pez | Typo) -> Results:
    return pez_search(ctx, p, unit_image_features(ctx.attacker, ctx.target_images), "PEZ")
