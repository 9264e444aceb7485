"""CLIP embeddings for any ``CLIPModel`` (mini world or hub), one implementation each: every text
and image the filter, its fine-tuning, the metrics and the attacks embed goes through here."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  normalize: bool = True) -> torch.Tensor:
    """Projected text embeddings phi_p (``N x D``) of token ids, unit-norm if ``normalize``;
    gradients flow (attacks feed optimised token embeddings through a hook)."""
    device = model.device
    out = model.get_text_features(
        input_ids=input_ids.to(device),
        attention_mask=None if attention_mask is None else attention_mask.to(device))
    emb = out.pooler_output.float()
    return F.normalize(emb, dim=-1) if normalize else emb


def text_embeddings(model, tokenizer, texts: list[str], normalize: bool = True,
                    batch: int = 256, grad: bool = False) -> torch.Tensor:
    """phi_p of ``texts``, padded to the tokenizer's context as CLIP pads, in batches of
    ``batch``; without an autograd graph unless ``grad`` (fine-tuning)."""
    with contextlib.nullcontext() if grad else torch.no_grad():
        parts = []
        for i in range(0, len(texts), batch):
            tokens = tokenizer(texts[i:i + batch], padding="max_length", truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt")
            parts.append(text_features(model, tokens.input_ids, tokens.attention_mask,
                                       normalize=False))
        emb = torch.cat(parts)
        return F.normalize(emb, dim=-1) if normalize else emb


def image_features(model, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Projected image embeddings phi_x (``N x D``) of preprocessed pixels, unit-norm if
    ``normalize``; gradients flow (CCE+ differentiates the filter's score of an image)."""
    out = model.get_image_features(pixel_values=pixel_values.to(model.device, model.dtype))
    emb = out.pooler_output.float()
    return F.normalize(emb, dim=-1) if normalize else emb


@torch.no_grad()
def image_embeddings(model, pixel_values: torch.Tensor, normalize: bool = True,
                     batch: int = 256) -> torch.Tensor:
    """phi_x of preprocessed pixels, in batches."""
    emb = torch.cat([image_features(model, pixel_values[i:i + batch], normalize=False)
                     for i in range(0, len(pixel_values), batch)])
    return F.normalize(emb, dim=-1) if normalize else emb
