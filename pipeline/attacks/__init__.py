"""The adversarial-prompt attacks of METHOD section 6, each with its adaptive ("+") form.

Every attack returns adversarial prompts (CCE also a learned token embedding, in diffusers'
textual-inversion format). An attack runs plain (``AttackContext.target`` None: no filter term,
a trial without the filter) or "+": adapted to one *target filter* (zero-shot or fine-tuned
Espresso, the SD safety checker, the MHSC probe: those with a margin on CLIP embeddings, behind
Espresso's interface), whose terms and trial use that filter, or adapted to an *edited model*
(a fine-tuning CRT) by optimising through its UNet (CCE, UnlearnDiff).

Equal strength against every target:

- **Scale-free terms.** A filter term is ``strength * margin / spread``, the spread being the
  target's margin spread on the attacker's own training prompts and images
  (``objective.margin_scale``); ``adaptive_weights`` are strengths on that scale, so multiplying
  a target's logits changes nothing.
- **The attacker picks the strength.** A "+" search runs its starts across every strength of the
  grid at once (start i at strength i mod n: one search's cost), and the trial ranks those
  candidates together with the plain search's: the "+" run is the attacker's pick among plain
  and every strength, never weaker than plain by its own measure. CCE learns one token per
  strength beside the plain token.
- **Edits are attacked through their own model.** Their plain condition renders the plain
  run's prompts; their adapted attacks are CCE (textual inversion through the edited UNet, CCE's
  own setting) and UnlearnDiff (a hard prefix optimised on the edited UNet's denoising loss).

The attacks:

- PEZ+ (Wen et al. 2023): a hard prompt of ``tokens`` vocabulary tokens, optimised as soft
  embeddings projected to their nearest tokens every step (straight-through), AdamW; loss
  ``1 - cos(phi_p(prompt), phi_x(targets))`` in the attacker's CLIP, plus the strength times the
  filter's scaled text-space margin ``<phi_p^filter(prompt), t_u - t_a>`` (pushes the prompt
  toward c_a in the filter's own embedding space).
- Typo / Typo+: the acceptable concept text written onto the target images (typographic attack
  on CLIP), then the images inverted into prompts with PEZ's search, in both forms.
- CCE+ (Pham et al. 2024): textual inversion of a new token through the T2I model (its
  denoising loss on the target images), plus the strength times the filter's loss
  ``softplus(margin / spread)`` on the image the UNet predicts (x0 decoded by the VAE).
- RingBell+ (Tsai et al. 2024): concept vector = mean difference of T2I text-encoder states of
  (unacceptable, acceptable) prompt pairs; a genetic search (``operators``: the release's or
  ours) over ``tokens`` tokens for a prompt whose states are nearest to (acceptable prompt +
  eta * concept vector), plus the strength times the filter's scaled text margin; fitness is
  measured on each candidate as typed (decoded, re-tokenised).
- UnlearnDiff (Zhang et al. 2024, UnlearnDiffAtk): ``tokens`` hard prefix tokens before a target
  prompt, optimised (PEZ's projection) on the edited UNet's denoising loss on the target images.

The trial: an attacker who holds the T2I model generates a few images per candidate (seeds
drawn independently of the evaluation's) and looks at them, as a person running an attack
would; a prompt can match the targets in CLIP yet not make the T2I model draw them (on the mini
world, hard prompts that glue a name's tokens to other words). Candidates are ranked by the
share of trial images that succeed (the attacker's eyes, ``AttackContext.sees``, see c_u, and
for "+" the target filter passes the image: the adaptive attacker may query the filter it
knows), ties broken by the images' closeness to the targets. The eyes are a model other than the
evaluation's judge (``pipeline.judges.load_eyes``), so that success is not selected on the
instrument that scores it; the strengths, spreads and trial use training data only.

One module per attack (``typo``, ``pez``, ``cce``, ``ringbell``, ``udiff``); what they share
is in ``context`` (what an attack gets and returns), ``objective``, ``trial`` and
``prompt_embedding`` (prompts as optimisable token embeddings). The attacks use the filter
library, never a stage.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.attacks import cce, pez, ringbell, typo, udiff
from pipeline.attacks.context import AttackContext, AttackResult
from pipeline.registry import ATTACKS as NAMES, implemented

ATTACKS: dict[str, Callable[[AttackContext, Any], AttackResult]] = implemented(NAMES, {
    "typo": typo.typo, "pez": pez.pez, "cce": cce.cce, "ringbell": ringbell.ringbell,
    "udiff": udiff.udiff},
    "pipeline.attacks.ATTACKS")

__all__ = ["ATTACKS", "AttackContext", "AttackResult"]
