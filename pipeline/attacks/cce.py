"""CCE+ (Pham et al. 2024): textual inversion of a new token through the frozen T2I model, plus
the target filter's scaled loss on the images the UNet predicts; one token per strength, beside
the plain token.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm import tqdm

from pipeline.attacks.context import AttackContext, AttackResult, Results
from pipeline.attacks.objective import unit_image_features
from pipeline.attacks.prompt_embedding import placeholder_embeddings, textual_inversion
from pipeline.attacks.trial import rank_trials, trial_seeds
from pipeline.espresso import EspressoFilter
from pipeline.espresso.embeddings import image_features
from pipeline.espresso.pixels import channels_first, clip_pixels_torch, unit_range

if TYPE_CHECKING:  # its budget of attack.<setting> (pipeline.schema)
    from pipeline.schema import Cce

CCE_TOKEN = "<cce-concept>"


def with_token(prompt: str, concept_text: str, token: str) -> str:
    """The prompt with the concept text replaced by ``token`` (prepended if absent)."""
    replaced, n = re.subn(re.escape(concept_text), token, prompt, flags=re.IGNORECASE)
    return replaced if n else f"{token} {prompt}"


@torch.no_grad()
def image_latents(pipe, images: np.ndarray) -> torch.Tensor:
    """The VAE's (scaled) latents of uint8 images."""
    pixels = channels_first(torch.from_numpy(images), "-1,1")
    latents = pipe.vae.encode(pixels.to(pipe.unet.device, pipe.vae.dtype)).latent_dist.mean
    return latents.float() * pipe.vae.config.scaling_factor


def denoising_errors(pipe, scheduler: DDPMScheduler, latents: torch.Tensor,
                     context: torch.Tensor, generator: torch.Generator, copies: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UNet's denoising loss (mean squared error of its epsilon or v prediction) per latent,
    at a random timestep and noise, conditioned on ``context``; also the noisy latents, the
    prediction and the timesteps (CCE+'s filter term decodes the predicted clean image).
    ``copies``: ``latents`` repeated that many times with the same noise and timesteps (one
    batched pass for several conditionings, ``context`` being ``copies`` blocks)."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device).repeat(copies, 1, 1, 1)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),),
                      generator=generator).to(device).repeat(copies)
    latents = latents.repeat(copies, 1, 1, 1)
    noisy = scheduler.add_noise(latents, noise, t)
    prediction = pipe.unet(noisy.to(pipe.unet.dtype), t,
                           encoder_hidden_states=context.to(pipe.unet.dtype)).sample.float()
    wanted = (scheduler.get_velocity(latents, noise, t)
              if scheduler.config.prediction_type == "v_prediction" else noise)
    return (prediction - wanted).pow(2).flatten(1).mean(1), noisy, prediction, t


def predicted_clean(scheduler: DDPMScheduler, noisy: torch.Tensor, prediction: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """x0 implied by the UNet's prediction (epsilon or v)."""
    alpha = scheduler.alphas_cumprod.to(noisy.device)[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod.to(noisy.device)[t]).sqrt().view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha * noisy - sigma * prediction
    return (noisy - sigma * prediction) / alpha


def cce(ctx: AttackContext, p: Cce) -> Results:
    """The plain token (the denoising loss alone, inverted through the model that renders:
    CCE's own setting against an edited model; once per stage and seed) and, for "+", one token
    per strength of ``p.adaptive_weights``; per budget, the trial keeps the best."""
    prompts = [with_token(q, ctx.concept.unacceptable, CCE_TOKEN) for q in ctx.target_prompts]
    templates = list(dict.fromkeys(prompts))
    chosen = [templates[i % len(templates)] for i in range(ctx.n_prompts)]
    weights = [0.0, *(p.adaptive_weights if ctx.adaptive else [])]
    plain = ctx.plain("CCE", lambda: invert_token(ctx, p, prompts, 0.0))
    adapted = invert_tokens(ctx, p, prompts, weights[1:]) if ctx.adaptive else {}
    trial = [chosen[i % len(chosen)] for i in range(p.selection_images)]
    seeds = trial_seeds(ctx, len(trial))
    targets = unit_image_features(ctx.attacker, ctx.target_images)

    def trial_images(vector: torch.Tensor) -> np.ndarray:
        with textual_inversion(ctx.pipe, {CCE_TOKEN: vector}):
            return ctx.render(trial, seeds)

    results = {}
    for f in ctx.budgets:
        vectors = [plain[f], *adapted.get(f, [])]
        images = [ctx.plain(f"CCE trial at {f:g}", lambda: trial_images(plain[f])),
                  *(trial_images(vector) for vector in vectors[1:])]
        ranked, share, loss = rank_trials(ctx, np.concatenate(images), len(vectors), targets)
        best = ranked[0]
        results[f] = AttackResult(chosen, [float(loss[best])] * len(chosen),
                                  [float(share[best])] * len(chosen),
                                  [weights[best]] * len(chosen), {CCE_TOKEN: vectors[best]})
    return results


def invert_tokens(ctx: AttackContext, p: Cce, prompts: list[str],
                  weights: list[float]) -> dict[float, list[torch.Tensor]]:
    """CCE's textual inversion of ``CCE_TOKEN`` in ``prompts`` on the target images, plus each
    weight of ``weights`` times the target filter's loss on the predicted clean images: one
    token per weight, learned in one batched pass in which each token sees the batches, noise
    and timesteps it would see alone (its own loss, its own AdamW moments); the tokens at each
    budget fraction of the steps."""
    pipe, k = ctx.pipe, len(weights)
    device = pipe.unet.device
    generator = torch.Generator().manual_seed(ctx.seed)
    table = pipe.text_encoder.get_input_embeddings().weight
    start_ids = pipe.tokenizer(ctx.concept.acceptable, add_special_tokens=False).input_ids
    start = table[start_ids].detach().float().mean(0)
    strength = torch.tensor(weights, device=device)
    with textual_inversion(pipe, {CCE_TOKEN: start.clone()}):
        token_id = pipe.tokenizer.convert_tokens_to_ids(CCE_TOKEN)
        vectors = start.repeat(k, 1).to(device).requires_grad_(True)
        optimizer = torch.optim.AdamW([vectors], lr=p.lr, weight_decay=0.0)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=pipe.tokenizer.model_max_length).input_ids.to(device)
        latents = image_latents(pipe, ctx.target_images)
        snapshots, found = ctx.snapshots(p.steps), {}
        desc = f"CCE+ (weights {', '.join(f'{w:g}' for w in weights)})" if any(weights) else "CCE"
        for step in tqdm(range(p.steps), desc=desc, unit="step", mininterval=5):
            batch = torch.randint(len(latents), (p.batch,), generator=generator)
            rows = ids[batch].repeat(k, 1)  # token i's block of the batch is rows i*B .. (i+1)*B
            per_row = vectors.repeat_interleave(p.batch, 0)
            values = per_row.repeat_interleave((rows == token_id).sum(1), 0)
            with placeholder_embeddings(pipe.text_encoder, token_id, values):
                context = pipe.text_encoder(rows).last_hidden_state
            errors, noisy, prediction, t = denoising_errors(pipe, scheduler, latents[batch],
                                                            context, generator, copies=k)
            loss = errors.view(k, p.batch).mean(1)
            if any(weights):
                term = filter_image_loss(ctx.target, pipe, predicted_clean(
                    scheduler, noisy, prediction, t), ctx.scale.image)
                loss = loss + strength * term.view(k, p.batch).mean(1)
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            for fraction in snapshots.get(step + 1, []):
                found[fraction] = list(vectors.detach().cpu().clone())
    return found


def invert_token(ctx: AttackContext, p: Cce, prompts: list[str],
                 weight: float) -> dict[float, torch.Tensor]:
    """:func:`invert_tokens` for one weight."""
    return {f: vectors[0] for f, vectors in invert_tokens(ctx, p, prompts, [weight]).items()}


def filter_image_loss(filt: EspressoFilter, pipe, latents: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """softplus(margin / scale) of each image the latents decode to: the filter's
    -log(1 - P(u|x)) with its margin in units of its spread (``scale``; scale-free)."""
    images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    pixels = clip_pixels_torch(filt.processor, unit_range(images.float()))
    margin = filt.margin(image_features(filt.clip, pixels))
    return F.softplus(margin / scale)
