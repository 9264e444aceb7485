"""Training losses, one implementation each: CLIP's multi-positive contrastive loss (the mini
CLIP's pre-training and Espresso's fine-tuning share it) and Espresso's fine-tuning objective
(METHOD section 3)::

    L = lambda_u * L_CLIP(x_u, p_u) + lambda_a * L_CLIP(x_a, p_a) - lambda_s * separation

The contrastive terms keep each prompt paired with its images (utility); the separation term
pushes unacceptable and acceptable text embeddings apart (effectiveness), in one of two forms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.espresso.embeddings import text_embeddings
from pipeline.espresso.filter import EspressoFilter


def multi_positive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss whose targets spread evenly over all true captions/images."""
    pos = positives.float()
    image_to_text = -(F.log_softmax(logits, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    text_to_image = -(F.log_softmax(logits, 0) * pos / pos.sum(0, keepdim=True)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, prompts: list[str],
                     scale: float) -> torch.Tensor:
    """CLIP's symmetric loss over the batch; identical prompts count as positives of each
    other's images (small concept vocabularies repeat prompts within a batch)."""
    same_prompt = torch.tensor([[a == b for b in prompts] for a in prompts])
    return multi_positive_loss(scale * image_emb @ text_emb.T, same_prompt)


def separation_concepts(emb_u, emb_a, t_u, t_a) -> torch.Tensor:
    """|t_u - t_a|_2 of the concept strings' embeddings, not squared (the paper's stated term)."""
    return (t_u - t_a).norm()


def separation_prompt_pairs(emb_u, emb_a, t_u, t_a) -> torch.Tensor:
    """(1/B) sum_i |t(p_u,i) - t(p_a,i)|^2 over the batch's paired prompts (the release's term)."""
    return (emb_u - emb_a).pow(2).sum(-1).mean()


SEPARATIONS = {"concepts": separation_concepts, "prompt_pairs": separation_prompt_pairs}


def espresso_loss(filt: EspressoFilter, batch: dict, weights: dict,
                  separation: str) -> dict[str, torch.Tensor]:
    """The three terms and their weighted total for one batch of aligned pairs; ``separation``
    names the form (a key of ``SEPARATIONS``)."""
    texts = batch["prompts_u"] + batch["prompts_a"] + [filt.unacceptable, filt.acceptable]
    emb = text_embeddings(filt.clip, filt.tokenizer, texts, batch=len(texts), grad=True)
    n = len(batch["prompts_u"])
    scale = filt.logit_scale
    terms = {
        "unacceptable": contrastive_loss(batch["images_u"], emb[:n], batch["prompts_u"], scale),
        "acceptable": contrastive_loss(batch["images_a"], emb[n:2 * n], batch["prompts_a"], scale),
        "separation": SEPARATIONS[separation](emb[:n], emb[n:2 * n], emb[-2], emb[-1]),
    }
    terms["total"] = (weights["unacceptable"] * terms["unacceptable"]
                      + weights["acceptable"] * terms["acceptable"]
                      - weights["separation"] * terms["separation"])
    return terms
