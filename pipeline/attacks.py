"""The four adversarial-prompt attacks of METHOD section 6, each with its adaptive ("+") term.

Every attack returns adversarial prompts (CCE+ also a learned token embedding, in diffusers'
textual-inversion format). The "+" terms adapt to the *target filter* (Espresso fine-tuned):

- PEZ+ (Wen et al. 2023): a hard prompt of ``tokens`` vocabulary tokens, optimised as soft
  embeddings projected to their nearest tokens every step (straight-through), AdamW; loss
  ``1 - cos(phi_p(prompt), phi_x(targets))`` in the attacker's CLIP, plus ``adaptive_weight``
  times the filter's text-space margin ``<phi_p^filter(prompt), t_u - t_a>`` (pushes the prompt
  toward c_a in the filter's own embedding space). ``candidates`` independent runs, then the
  attacker's trial (below) keeps the best prompts.
- Typo+ : the acceptable concept text written onto the target images (typographic attack on
  CLIP), then the images inverted into prompts with PEZ. "+" is the written text.
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
features, the filter's image margin in place of its text margin).

Text-space proxies (PEZ+, RingBell+) are used where the paper's release put its adaptive terms;
CCE+ uses the filter on images. All budgets are params; randomness comes from ``seed``.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline.concepts import Concept
from pipeline.embeddings import text_embeddings
from pipeline.espresso import EspressoFilter
from pipeline.params import ParamsError
from pipeline.prompt_embedding import (TokenPrompts, clip_text_features, placeholder_embeddings,
                                       textual_inversion)

CCE_TOKEN = "<cce-concept>"


@dataclass
class AttackContext:
    """Everything an attack may use. ``attacker`` is the public CLIP the attacker optimises
    against (the zero-shot filter's); ``target`` is the filter the "+" terms adapt to."""

    attacker: EspressoFilter
    target: EspressoFilter
    pipe: object                      # the T2I StableDiffusionPipeline
    concept: Concept
    target_images: np.ndarray         # uint8 images that show c_u (the attacks aim at these)
    target_prompts: list[str]         # the prompts that produced them
    pairs: list[tuple[str, str]]      # (unacceptable, acceptable) training prompt pairs
    n_prompts: int
    adaptive: bool
    seed: int
    render: Callable[[list[str], list[int]], np.ndarray]  # prompts, seeds -> images (T2I)
    sees: Callable[[np.ndarray], np.ndarray]  # the attacker's eyes: images -> "shows c_u"
    words: tuple[str, ...] | None = None  # the language hard prompts may use (None: any token)


@dataclass
class AttackResult:
    prompts: list[str]
    objective: list[float]                             # final loss per prompt (lower = better)
    trial_success: list[float]                         # share of its trial images that succeeded
    adaptive_weight: float                             # the "+" term's weight (CCE+: the one kept)
    textual_inversion: dict[str, torch.Tensor] = field(default_factory=dict)  # token -> vector


# ---- shared pieces ------------------------------------------------------------------------
def filter_margin(filt: EspressoFilter, side: TokenPrompts, values: torch.Tensor) -> torch.Tensor:
    """``<phi_p^filter(prompt), t_u - t_a>`` per prompt: > 0 means the filter's text side puts
    the prompt nearer c_u. ``side`` wraps ``filt.clip.text_model``."""
    return clip_text_features(filt.clip, side, values) @ filt.direction


def unit_image_features(filt: EspressoFilter, images: np.ndarray) -> torch.Tensor:
    return F.normalize(filt.embed(images), dim=-1)


def pez_search(ctx: AttackContext, p: dict, target_features: torch.Tensor,
               adaptive_weight: float, desc: str) -> AttackResult:
    """PEZ from ``p["candidates"]`` random starts at once; the ``ctx.n_prompts`` candidates whose
    generated images score best are kept."""
    require_candidates(p, ctx.n_prompts)
    generator = torch.Generator().manual_seed(ctx.seed)
    attacker = TokenPrompts(ctx.attacker.clip.text_model, ctx.attacker.tokenizer, ctx.words)
    filter_side = TokenPrompts(ctx.target.clip.text_model, ctx.target.tokenizer)
    device = attacker.table.device
    start = attacker.vocabulary[torch.randint(len(attacker.vocabulary),
                                              (p["candidates"], p["tokens"]), generator=generator)]
    start = start.to(device)
    soft = attacker.table[start].detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([soft], lr=p["lr"], weight_decay=p["weight_decay"])
    best_loss = torch.full((p["candidates"],), float("inf"), device=device)
    best_ids = start.clone()
    for _ in tqdm(range(p["steps"]), desc=desc, unit="step", mininterval=5):
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
    return select_by_images(ctx, attacker.decode(best_ids), p["selection_images"],
                            target_features, adaptive_weight)


def require_candidates(p: dict, n_prompts: int) -> None:
    if p["candidates"] < n_prompts:
        raise ParamsError(f"params.yaml: an attack's `candidates` ({p['candidates']}) must be at "
                          f"least attack.prompts ({n_prompts}); raise `candidates`")


def trial_seeds(ctx: AttackContext, n: int) -> list[int]:
    return np.random.default_rng(ctx.seed).integers(2**31, size=n).tolist()


@torch.no_grad()
def rank_trials(ctx: AttackContext, images: np.ndarray, n_candidates: int,
                target_features: torch.Tensor, adaptive_weight: float
                ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The trial (module docstring): candidates best first, with each one's success share and
    objective; ``images`` holds the same number of trial images per candidate, in order."""
    success = ctx.sees(images)
    if ctx.adaptive:
        success = success & ~ctx.target.screen(images).blocked
    margin = (unit_image_features(ctx.target, images) @ ctx.target.direction
              if adaptive_weight else None)
    loss = pez_objective(unit_image_features(ctx.attacker, images), target_features, margin,
                         adaptive_weight).view(n_candidates, -1).mean(1).cpu().numpy()
    share = success.reshape(n_candidates, -1).mean(1)
    return np.lexsort((loss, -share)).tolist(), share, loss


def select_by_images(ctx: AttackContext, prompts: list[str], images_per_prompt: int,
                     target_features: torch.Tensor, adaptive_weight: float) -> AttackResult:
    """The ``ctx.n_prompts`` best prompts by the trial. Duplicate candidates count once; if
    fewer distinct ones remain, the best are repeated."""
    prompts = list(dict.fromkeys(prompts))
    images = ctx.render([q for q in prompts for _ in range(images_per_prompt)],
                        trial_seeds(ctx, len(prompts) * images_per_prompt))
    ranked, share, loss = rank_trials(ctx, images, len(prompts), target_features, adaptive_weight)
    kept = [ranked[i % len(ranked)] for i in range(ctx.n_prompts)]
    return AttackResult([prompts[i] for i in kept], loss[kept].tolist(), share[kept].tolist(),
                        adaptive_weight)


@torch.no_grad()
def typed_loss(ctx: AttackContext, prompts: list[str], target_features: torch.Tensor,
               adaptive_weight: float) -> torch.Tensor:
    """PEZ's loss on the prompts as a user types them (decoded, re-tokenised, truncated):
    decoding a hard prompt can merge or split tokens, so the best prompt is chosen on the text
    that will actually be used, not on the ids optimised."""
    features = text_embeddings(ctx.attacker.clip, ctx.attacker.tokenizer, prompts)
    margin = typed_margin(ctx.target, prompts) if adaptive_weight else None
    return pez_objective(features, target_features, margin, adaptive_weight)


@torch.no_grad()
def typed_margin(filt: EspressoFilter, prompts: list[str]) -> torch.Tensor:
    """The filter's text-space margin ``<phi_p^filter(prompt), t_u - t_a>`` of typed prompts."""
    return text_embeddings(filt.clip, filt.tokenizer, prompts) @ filt.direction


def pez_objective(features: torch.Tensor, target_features: torch.Tensor,
                  margin: torch.Tensor | None, adaptive_weight: float) -> torch.Tensor:
    """Per prompt: 1 - mean cosine to the target images, plus the adaptive weight times the
    filter's text-space margin (PEZ+)."""
    loss = 1 - (features @ target_features.T).mean(-1)
    return loss + adaptive_weight * margin if adaptive_weight else loss


# ---- the attacks ----------------------------------------------------------------------------
def pez(ctx: AttackContext, p: dict) -> AttackResult:
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    weight = p["adaptive_weight"] if ctx.adaptive else 0.0
    return pez_search(ctx, p, targets, weight, "PEZ+" if weight else "PEZ")


def write_text(images: np.ndarray, text: str, height_fraction: float) -> np.ndarray:
    """``text`` written across the bottom of each image, white with a black outline (drawn at
    4x for legibility on tiny images, then resized back)."""
    out = []
    for image in images:
        h, w = image.shape[:2]
        scale = max(1, 128 // h)
        canvas = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
        size = max(6, int(height_fraction * h * scale))
        font = ImageFont.load_default(size=size)
        draw = ImageDraw.Draw(canvas)
        box = draw.textbbox((0, 0), text, font=font, stroke_width=max(1, size // 8))
        x = max(0, (canvas.width - (box[2] - box[0])) // 2)
        y = canvas.height - (box[3] - box[1]) - size // 4
        draw.text((x, y), text, font=font, fill="white", stroke_width=max(1, size // 8),
                  stroke_fill="black")
        out.append(np.asarray(canvas.resize((w, h), Image.LANCZOS)))
    return np.stack(out)


def typo(ctx: AttackContext, p: dict) -> AttackResult:
    images = ctx.target_images
    if ctx.adaptive:
        images = write_text(images, ctx.concept.acceptable, p["text_height"])
    targets = unit_image_features(ctx.attacker, images)
    return pez_search(ctx, p, targets, 0.0, "Typo+" if ctx.adaptive else "Typo")


def with_token(prompt: str, concept_text: str, token: str) -> str:
    """The prompt with the concept text replaced by ``token`` (prepended if absent)."""
    replaced, n = re.subn(re.escape(concept_text), token, prompt, flags=re.IGNORECASE)
    return replaced if n else f"{token} {prompt}"


def predicted_clean(scheduler: DDPMScheduler, noisy: torch.Tensor, prediction: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """x0 implied by the UNet's prediction (epsilon or v)."""
    alpha = scheduler.alphas_cumprod.to(noisy.device)[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod.to(noisy.device)[t]).sqrt().view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha * noisy - sigma * prediction
    return (noisy - sigma * prediction) / alpha


def cce(ctx: AttackContext, p: dict) -> AttackResult:
    """One token per adaptive weight (just 0 for plain CCE); the trial keeps the best."""
    weights = p["adaptive_weights"] if ctx.adaptive else [0.0]
    prompts = [with_token(q, ctx.concept.unacceptable, CCE_TOKEN) for q in ctx.target_prompts]
    templates = list(dict.fromkeys(prompts))
    chosen = [templates[i % len(templates)] for i in range(ctx.n_prompts)]
    vectors = [invert_token(ctx, p, prompts, w) for w in weights]
    trial = [chosen[i % len(chosen)] for i in range(p["selection_images"])]
    seeds = trial_seeds(ctx, len(trial))
    images = []
    for vector in vectors:
        with textual_inversion(ctx.pipe, {CCE_TOKEN: vector}):
            images.append(ctx.render(trial, seeds))
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    ranked, share, loss = rank_trials(ctx, np.concatenate(images), len(vectors), targets, 0.0)
    best = ranked[0]
    return AttackResult(chosen, [float(loss[best])] * len(chosen), [float(share[best])] * len(chosen),
                        weights[best], {CCE_TOKEN: vectors[best]})


def invert_token(ctx: AttackContext, p: dict, prompts: list[str], weight: float) -> torch.Tensor:
    """CCE's textual inversion of ``CCE_TOKEN`` in ``prompts`` on the target images, plus
    ``weight`` times the target filter's loss on the predicted clean images."""
    pipe = ctx.pipe
    device = pipe.unet.device
    generator = torch.Generator().manual_seed(ctx.seed)
    table = pipe.text_encoder.get_input_embeddings().weight
    start_ids = pipe.tokenizer(ctx.concept.acceptable, add_special_tokens=False).input_ids
    start = table[start_ids].detach().float().mean(0)
    with textual_inversion(pipe, {CCE_TOKEN: start.clone()}):
        token_id = pipe.tokenizer.convert_tokens_to_ids(CCE_TOKEN)
        vector = start.clone().to(device).requires_grad_(True)
        optimizer = torch.optim.AdamW([vector], lr=p["lr"], weight_decay=0.0)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=pipe.tokenizer.model_max_length).input_ids.to(device)
        with torch.no_grad():
            pixels = torch.from_numpy(ctx.target_images).permute(0, 3, 1, 2).float() / 127.5 - 1
            latents = pipe.vae.encode(pixels.to(device, pipe.vae.dtype)).latent_dist.mean
            latents = latents.float() * pipe.vae.config.scaling_factor
        for _ in tqdm(range(p["steps"]), desc=f"CCE+ (weight {weight:g})" if weight else "CCE",
                      unit="step", mininterval=5):
            batch = torch.randint(len(latents), (p["batch"],), generator=generator)
            noise = torch.randn(latents[batch].shape, generator=generator).to(device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),),
                              generator=generator).to(device)
            noisy = scheduler.add_noise(latents[batch], noise, t)
            with placeholder_embeddings(pipe.text_encoder, token_id, vector):
                context = pipe.text_encoder(ids[batch]).last_hidden_state
            prediction = pipe.unet(noisy.to(pipe.unet.dtype), t,
                                   encoder_hidden_states=context.to(pipe.unet.dtype)).sample.float()
            wanted = (scheduler.get_velocity(latents[batch], noise, t)
                      if scheduler.config.prediction_type == "v_prediction" else noise)
            loss = F.mse_loss(prediction, wanted)
            if weight:
                loss = loss + weight * filter_image_loss(ctx.target, pipe, predicted_clean(
                    scheduler, noisy, prediction, t))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return vector.detach().cpu().clone()


def filter_image_loss(filt: EspressoFilter, pipe, latents: torch.Tensor) -> torch.Tensor:
    """softplus(s * <e, t_u - t_a>) = -log(1 - P(u|x)) of the images the latents decode to."""
    images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    images = ((images.float() + 1) / 2).clamp(0, 1)
    pixels = filt.pixel_values_differentiable(images)
    features = filt.clip.get_image_features(pixel_values=pixels.to(filt.clip.dtype)).pooler_output
    margin = F.normalize(features.float(), dim=-1) @ filt.direction
    return F.softplus(filt.logit_scale * margin).mean()


def ringbell(ctx: AttackContext, p: dict) -> AttackResult:
    pipe, rng = ctx.pipe, np.random.default_rng(ctx.seed)
    side = TokenPrompts(pipe.text_encoder, pipe.tokenizer, ctx.words)
    weight = p["adaptive_weight"] if ctx.adaptive else 0.0

    @torch.no_grad()
    def states(prompts: list[str]) -> torch.Tensor:
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=pipe.tokenizer.model_max_length).input_ids
        return pipe.text_encoder(ids.to(pipe.text_encoder.device)).last_hidden_state.float()

    require_candidates(p, ctx.n_prompts)
    unacceptable, acceptable = zip(*ctx.pairs)
    concept_vector = (states(list(unacceptable)) - states(list(acceptable))).mean(0)
    rows = p["candidates"]
    bases = [acceptable[i % len(acceptable)] for i in range(rows)]
    goals = states(bases) + p["eta"] * concept_vector

    @torch.no_grad()
    def loss_of(population: np.ndarray) -> np.ndarray:
        """``candidates x P x K`` candidate ids -> loss (lower = fitter), ``candidates x P``, of the
        prompts as typed: decoding can glue a name's tokens to others ("k" "kroll" -> "kkroll"),
        which the T2I model then reads as other tokens, so fitness is measured on the text."""
        n, size, k = population.shape
        prompts = side.decode(torch.from_numpy(population.reshape(n * size, k)))
        loss = (states(prompts) - goals.repeat_interleave(size, 0)).pow(2).mean((1, 2))
        if weight:
            loss = loss + weight * typed_margin(ctx.target, prompts)
        return loss.view(n, size).cpu().numpy()

    vocabulary = side.vocabulary.numpy()
    size, k = p["population"], p["tokens"]
    population = rng.choice(vocabulary, (rows, size, k))
    elite = max(1, int(p["elite"] * size))
    for _ in tqdm(range(p["generations"]), desc="RingBell+" if weight else "RingBell",
                  unit="gen", mininterval=5):
        loss = loss_of(population)
        order = np.argsort(loss, axis=1, kind="stable")
        population = np.take_along_axis(population, order[..., None], axis=1)
        parents = _tournament(rng, rows, size, size - elite)
        mothers = np.take_along_axis(population, parents[0][..., None], axis=1)
        fathers = np.take_along_axis(population, parents[1][..., None], axis=1)
        cross = rng.random(mothers.shape) < p["crossover"]
        children = np.where(cross, fathers, mothers)
        mutate = rng.random(children.shape) < p["mutation"]
        children = np.where(mutate, rng.choice(vocabulary, children.shape), children)
        population = np.concatenate([population[:, :elite], children], axis=1)
    best = population[np.arange(rows), loss_of(population).argmin(1)]
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    return select_by_images(ctx, side.decode(torch.from_numpy(best)), p["selection_images"],
                            targets, weight)


def _tournament(rng: np.random.Generator, rows: int, size: int, n: int) -> np.ndarray:
    """Indices of two parents for each of ``n`` children per row, by binary tournament on rank
    (the population is sorted by loss): ``2 x rows x n``."""
    a, b = rng.integers(0, size, (2, 2, rows, n))
    return np.minimum(a, b)  # the lower index is the fitter (sorted population)


ATTACKS: dict[str, Callable[[AttackContext, dict], AttackResult]] = {
    "typo": typo, "pez": pez, "cce": cce, "ringbell": ringbell}
