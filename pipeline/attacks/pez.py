"""PEZ+ (Wen et al. 2023): hard prompts optimised as projected soft embeddings. Its search,
:func:`pez_search`, is also Typo's (plain and "+").
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from pipeline.attacks.context import AttackContext, AttackResult
from pipeline.attacks.objective import pez_objective, typed_margin, unit_image_features
from pipeline.attacks.prompt_embedding import TokenPrompts, clip_text_features
from pipeline.attacks.trial import select_by_images
from pipeline.espresso import EspressoFilter, text_embeddings

if TYPE_CHECKING:  # its budget of attack.<setting> (pipeline.schema)
    from pipeline.schema import Pez, Typo


def filter_margin(filt: EspressoFilter, side: TokenPrompts, values: torch.Tensor) -> torch.Tensor:
    """``<phi_p^filter(prompt), t_u - t_a>`` per prompt: > 0 means the filter's text side puts
    the prompt nearer c_u. ``side`` wraps ``filt.clip.text_model``."""
    return filt.margin(clip_text_features(filt.clip, side, values))


@torch.no_grad()
def typed_loss(ctx: AttackContext, prompts: list[str], target_features: torch.Tensor,
               adaptive_weight: float) -> torch.Tensor:
    """PEZ's loss on the prompts as a user types them (decoded, re-tokenised, truncated):
    decoding a hard prompt can merge or split tokens, so the best prompt is chosen on the text
    that will actually be used, not on the ids optimised."""
    features = text_embeddings(ctx.attacker.clip, ctx.attacker.tokenizer, prompts)
    margin = typed_margin(ctx.target, prompts) if adaptive_weight else None
    return pez_objective(features, target_features, margin, adaptive_weight)


def pez_candidates(ctx: AttackContext, p: Pez | Typo, target_features: torch.Tensor,
                   adaptive_weight: float, desc: str) -> list[str]:
    """PEZ from ``p.candidates`` random starts at once (``ctx.seed``); per start, the prompt
    with the best loss as typed. ``adaptive_weight`` > 0 needs ``ctx.target``."""
    generator = torch.Generator().manual_seed(ctx.seed)
    attacker = TokenPrompts(ctx.attacker.clip.text_model, ctx.attacker.tokenizer, ctx.words)
    filter_side = (TokenPrompts(ctx.target.clip.text_model, ctx.target.tokenizer)
                   if adaptive_weight else None)
    device = attacker.table.device
    start = attacker.vocabulary[torch.randint(len(attacker.vocabulary),
                                              (p.candidates, p.tokens), generator=generator)]
    start = start.to(device)
    soft = attacker.table[start].detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([soft], lr=p.lr, weight_decay=p.weight_decay)
    best_loss = torch.full((p.candidates,), float("inf"), device=device)
    best_ids = start.clone()
    for _ in tqdm(range(p.steps), desc=desc, unit="step", mininterval=5):
        ids = attacker.project(soft.detach())
        features = clip_text_features(ctx.attacker.clip, attacker, attacker.embed(ids, soft))
        margin = (filter_margin(ctx.target, filter_side, filter_side.embed(ids, soft))
                  if adaptive_weight else None)
        loss = pez_objective(features, target_features, margin, adaptive_weight)
        typed = typed_loss(ctx, attacker.decode(ids), target_features, adaptive_weight)
        better = typed < best_loss
        best_loss[better], best_ids[better] = typed[better], ids[better]
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
    return attacker.decode(best_ids)


def pez_search(ctx: AttackContext, p: Pez | Typo, target_features: torch.Tensor,
               adaptive_weight: float, desc: str) -> AttackResult:
    """PEZ's candidates, of which the trial keeps the ``ctx.n_prompts`` best."""
    candidates = (pez_candidates(ctx, p, target_features, adaptive_weight, desc)
                  if adaptive_weight else
                  ctx.plain_candidates(desc, lambda: pez_candidates(ctx, p, target_features, 0.0,
                                                                    desc)))
    return select_by_images(ctx, candidates, p.selection_images, target_features,
                            adaptive_weight)


def pez(ctx: AttackContext, p: Pez | Typo) -> AttackResult:
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    weight = p.adaptive_weight if ctx.adaptive else 0.0
    return pez_search(ctx, p, targets, weight, "PEZ+" if weight else "PEZ")
