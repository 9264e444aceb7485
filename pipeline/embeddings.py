"""CLIP embeddings in batches, for any ``CLIPModel`` (mini world or hub)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def text_embeddings(model, tokenizer, texts: list[str], normalize: bool = True,
                    batch: int = 256) -> torch.Tensor:
    """Projected text embeddings ``N x D`` (phi_p), unit-norm if ``normalize``."""
    device = model.device
    parts = []
    for i in range(0, len(texts), batch):
        tokens = tokenizer(texts[i:i + batch], padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt")
        out = model.get_text_features(input_ids=tokens.input_ids.to(device),
                                      attention_mask=tokens.attention_mask.to(device))
        parts.append(out.pooler_output.float())
    emb = torch.cat(parts)
    return F.normalize(emb, dim=-1) if normalize else emb


@torch.no_grad()
def image_embeddings(model, pixel_values: torch.Tensor, normalize: bool = True,
                     batch: int = 256) -> torch.Tensor:
    """Projected image embeddings ``N x D`` (phi_x) of preprocessed pixels."""
    parts = [model.get_image_features(pixel_values=pixel_values[i:i + batch].to(
        model.device, model.dtype)).pooler_output.float()
        for i in range(0, len(pixel_values), batch)]
    emb = torch.cat(parts)
    return F.normalize(emb, dim=-1) if normalize else emb
