"""Mini Stable Diffusion: a latent diffusion model in diffusers' own classes, trained on the world.

The VAE maps 32x32 images to 4x16x16 latents; the UNet is conditioned (cross-attention) on the
frozen mini-CLIP text encoder's last hidden state, as SD v1 is on CLIP ViT-L/14. The objective
matters more than anything else at this size: epsilon prediction with linear betas gives blobs,
while v-prediction + the cosine schedule + min-SNR weighting learns shapes, colours and textures.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.training_utils import EMAModel, compute_snr
from tqdm import tqdm

from pipeline.espresso.pixels import channels_first
from pipeline.mini import shapes

if TYPE_CHECKING:  # the world section's models (pipeline.schema)
    from pipeline.schema import WorldUnet, WorldVae


def build_vae(image_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, mid_block_add_attention=False)


def build_unet(latent_size: int, text_width: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width, attention_head_dim=8)


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False, steps_offset=1)


def train_vae(p: WorldVae, images: np.ndarray, seed: int, device: str = "cpu") -> AutoencoderKL:
    """L1 + MSE reconstruction + a tiny KL term; ``scaling_factor`` set from the latent std."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = build_vae(images.shape[1]).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=p.lr)
    pixels = torch.from_numpy(images)
    for _ in (bar := tqdm(range(p.steps), desc="mini VAE", mininterval=10)):
        x = channels_first(pixels[rng.choice(len(pixels), p.batch, replace=False)].to(device),
                           "-1,1")
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + p.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        sample = channels_first(
            pixels[rng.choice(len(pixels), min(512, len(pixels)), replace=False)].to(device), "-1,1")
        std = vae.encode(sample).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae.cpu()


def train_unet(p: WorldUnet, images: np.ndarray, scenes: list[shapes.Scene], vae: AutoencoderKL,
               text_encoder, tokenizer, seed: int, character_share: float = 0.25,
               device: str = "cpu") -> UNet2DConditionModel:
    """v-prediction with min-SNR-gamma weighting, ``empty_caption_prob`` empty captions for
    classifier-free guidance, EMA weights returned."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    latent_size = images.shape[1] // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(latent_size, text_encoder.config.hidden_size).to(device)
    vae, text_encoder = vae.to(device), text_encoder.to(device)
    ema = EMAModel(unet.parameters(), decay=p.ema_decay)
    scheduler = training_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=p.lr)
    pixels, weights = torch.from_numpy(images), shapes.sampling_weights(scenes, character_share)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    for _ in (bar := tqdm(range(p.steps), desc="mini UNet", mininterval=10)):
        idx = rng.choice(len(scenes), p.batch, replace=False, p=weights)
        texts = ["" if rng.random() < p.empty_caption_prob else shapes.caption(scenes[i], rng)[0]
                 for i in idx]
        with torch.no_grad():
            latents = vae.encode(channels_first(pixels[idx].to(device), "-1,1")).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            context = text_encoder(tokens.input_ids.to(device)).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),)).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        snr = compute_snr(scheduler, t)
        weight = torch.clamp(snr, max=p.snr_gamma) / (snr + 1)  # min-SNR for v-prediction
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean((1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(unet.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    final = copy.deepcopy(unet)
    ema.copy_to(final.parameters())
    vae.cpu(), text_encoder.cpu()
    return final.cpu().eval()


def assemble_pipeline(vae, unet, text_encoder, tokenizer) -> StableDiffusionPipeline:
    """A standard ``StableDiffusionPipeline`` around the mini components (DPM-Solver++ sampler,
    no built-in safety checker: filtering is this project's job)."""
    scheduler = DPMSolverMultistepScheduler.from_config(training_scheduler().config)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


#: The pipeline's parts that are the CLIP's own (its text tower and tokenizer), stored once.
SHARED_WITH_CLIP = ("text_encoder", "tokenizer")


def link_text_side(sd_folder: Path, clip_folder: Path, final_sd_folder: Path | None = None) -> None:
    """Replace a saved pipeline's ``text_encoder/`` and ``tokenizer/`` by relative links to the
    CLIP folder: the text encoder is the CLIP's text tower, stored once, and the folder still
    loads with ``StableDiffusionPipeline.from_pretrained`` (transformers reads a
    ``CLIPTextModel`` from a ``CLIPModel`` folder). ``final_sd_folder``: where ``sd_folder``
    will end up, if it is a temporary folder (the links are relative to the final place)."""
    target = os.path.relpath(clip_folder, final_sd_folder or sd_folder)
    for name in SHARED_WITH_CLIP:
        path = sd_folder / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        path.symlink_to(target, target_is_directory=True)
