"""Mini CLIP: a transformers ``CLIPModel`` trained on the shapes world.

Plain CLIP loss on this world leaves attributes that always co-occur in captions (e.g. "striped
star" vs "checkered star") nearly identical in text space, so training uses a *multi-positive*
contrastive loss (every caption in the batch that correctly describes an image is a positive) on
batches of hard-negative groups (4 images that differ in exactly one attribute).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, get_cosine_schedule_with_warmup

from pipeline.espresso.losses import multi_positive_loss
from pipeline.espresso.pixels import channels_first, clip_pixels_torch
from pipeline.mini import shapes

if TYPE_CHECKING:  # the world section's models (pipeline.schema)
    from pipeline.schema import WorldClip


def clip_config(p: WorldClip, image_size: int) -> CLIPConfig:
    """CLIP config of the mini world (``p`` = ``world.clip`` params)."""
    tower = dict(hidden_size=p.width, num_hidden_layers=p.layers,
                 num_attention_heads=p.heads, intermediate_size=4 * p.width)
    return CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=p.context_length,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(tower, image_size=image_size, patch_size=p.patch),
        projection_dim=p.width,
    )


def image_processor(image_size: int) -> CLIPImageProcessor:
    """CLIP's preprocessing (OpenAI mean/std) at the mini world's resolution."""
    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size})


def train_clip(p: WorldClip, images: np.ndarray, scenes: list[shapes.Scene], varied: list[str],
               tokenizer, seed: int, device: str = "cpu") -> CLIPModel:
    """Train mini CLIP for ``p.steps`` steps on rendered hard-negative groups.

    ``images``/``scenes``/``varied`` come from :func:`shapes.render_groups` (groups of 4 are
    consecutive); the varied attribute is always kept in the group's captions."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    image_size = images.shape[1]
    model = CLIPModel(clip_config(p, image_size)).to(device)
    processor = image_processor(image_size)
    pixels = torch.from_numpy(images)
    labels = shapes.label_matrix(scenes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.98),
                                  weight_decay=p.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, p.warmup, p.steps)
    n_groups, groups_per_batch = len(scenes) // 4, p.batch // 4
    model.train()
    for _ in (bar := tqdm(range(p.steps), desc="mini CLIP", mininterval=10)):
        groups = rng.choice(n_groups, groups_per_batch, replace=False)
        idx = (groups[:, None] * 4 + np.arange(4)).ravel()
        texts, said = zip(*(shapes.caption(scenes[i], rng, keep=[varied[i]]) for i in idx))
        positives = shapes.describes_matrix(
            labels[idx], np.stack([shapes.caption_vector(s) for s in said]))
        batch = pixels[idx]
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        batch[flip] = batch[flip].flip(2)
        tokens = tokenizer(list(texts), padding="max_length", max_length=p.context_length,
                           truncation=True, return_tensors="pt")
        out = model(input_ids=tokens.input_ids.to(device),
                    attention_mask=tokens.attention_mask.to(device),
                    pixel_values=clip_pixels_torch(processor,
                                                   channels_first(batch.to(device), "0,1")))
        loss = multi_positive_loss(out.logits_per_image, torch.from_numpy(positives).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.cpu().eval()
