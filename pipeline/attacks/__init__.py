"""The four adversarial-prompt attacks of METHOD section 6, each with its adaptive ("+") term.

Every attack returns adversarial prompts (CCE+ also a learned token embedding, in diffusers'
textual-inversion format). An attack runs plain (``AttackContext.target`` None: no filter term,
a trial without the filter) or "+", adapted to one *target filter* (zero-shot or fine-tuned
Espresso, or the threshold filter: those with a linear margin on CLIP embeddings, behind
Espresso's interface), whose terms and trial use that filter:

- PEZ+ (Wen et al. 2023): a hard prompt of ``tokens`` vocabulary tokens, optimised as soft
  embeddings projected to their nearest tokens every step (straight-through), AdamW; loss
  ``1 - cos(phi_p(prompt), phi_x(targets))`` in the attacker's CLIP, plus ``adaptive_weight``
  times the filter's text-space margin ``<phi_p^filter(prompt), t_u - t_a>`` (pushes the prompt
  toward c_a in the filter's own embedding space). ``candidates`` independent runs, then the
  attacker's trial (below) keeps the best prompts.
- Typo / Typo+: the acceptable concept text written onto the target images (typographic attack
  on CLIP), then the images inverted into prompts with PEZ's search, in both forms; "+" adds
  PEZ+'s text-margin term (Typo's own ``adaptive_weight``) and the trial against the filter.
- CCE+ (Pham et al. 2024): textual inversion of a new token through the frozen T2I model
  (its denoising loss on the target images), plus an adaptive weight times the filter's loss
  ``softplus(s * margin)`` on the image the UNet predicts (x0 decoded by the VAE). The weight
  trades drawing c_u against passing the filter, sharply and differently per concept (on zorbo:
  0.004 always draws c_u and is always blocked, 0.01 never draws it), so CCE+ learns one token
  per weight of ``adaptive_weights`` and the trial keeps the best.
- RingBell+ (Tsai et al. 2024): concept vector = mean difference of T2I text-encoder states of
  (unacceptable, acceptable) prompt pairs; a genetic search over ``tokens`` tokens for a prompt
  whose states are nearest to (acceptable prompt + eta * concept vector); the loss also adds
  ``adaptive_weight`` times the filter's text-space margin of the candidate (penalises being
  flagged). Fitness is measured on each candidate as typed (decoded, re-tokenised). One search
  per candidate, then the trial keeps the best prompts.

The trial: an attacker who holds the T2I model generates a few images per candidate (seeds
drawn independently of the evaluation's) and looks at them, as a person running an attack
would; a prompt can match the targets in CLIP yet not make the T2I model draw them (on the mini
world, hard prompts that glue a name's tokens to other words). Candidates are ranked by the
share of trial images that succeed (the attacker's eyes, ``AttackContext.sees``, see c_u, and
for "+" the target filter passes the image: the adaptive attacker may query the filter it
knows), ties broken by PEZ's objective on the images (image features in place of prompt
features, the filter's image margin in place of its text margin). The eyes are a model other
than the evaluation's judge (``pipeline.judges.load_eyes``), so that success is not selected on
the instrument that scores it.

Text-space proxies (PEZ+, Typo+, RingBell+) are used where the paper's release put its adaptive terms;
CCE+ uses the filter on images. All budgets are params; randomness comes from ``seed``.

One module per attack (``typo``, ``pez``, ``cce``, ``ringbell``); what they share is in
``context`` (what an attack gets and returns), ``objective``, ``trial`` and ``prompt_embedding``
(prompts as optimisable token embeddings). The attacks use the filter library, never a stage.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.attacks import cce, pez, ringbell, typo
from pipeline.attacks.context import AttackContext, AttackResult
from pipeline.registry import ATTACKS as NAMES, implemented

ATTACKS: dict[str, Callable[[AttackContext, Any], AttackResult]] = implemented(NAMES, {
    "typo": typo.typo, "pez": pez.pez, "cce": cce.cce, "ringbell": ringbell.ringbell},
    "pipeline.attacks.ATTACKS")

__all__ = ["ATTACKS", "AttackContext", "AttackResult"]
