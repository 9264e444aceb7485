"""UnlearnDiffAtk (Zhang et al. 2024): an attack on an edited (unlearned) model through the model
itself. A prefix of ``tokens`` hard tokens, optimised as soft embeddings projected to their
nearest vocabulary tokens (PEZ's straight-through projection), is put before a target prompt so
that the *edited* UNet's denoising loss on the target images (real images of c_u the attacker's
eyes confirmed) is minimal: the prompt under which the edited model still reconstructs the
concept. ``candidates`` random starts at once, start i on target prompt i (round robin) and its
own images; the trial, rendered by the edited model, keeps the best prompts. It needs no filter
and adapts to whichever UNet ``ctx.pipe`` holds while it runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm import tqdm

from pipeline.attacks.cce import denoising_errors, image_latents
from pipeline.attacks.context import AttackContext, Results
from pipeline.attacks.objective import unit_image_features
from pipeline.attacks.prompt_embedding import TokenPrompts, placeholder_embeddings
from pipeline.attacks.trial import select_by_images

if TYPE_CHECKING:  # its budget of attack.<setting> (pipeline.schema)
    from pipeline.schema import UnlearnDiff


def udiff(ctx: AttackContext, p: UnlearnDiff) -> Results:
    targets = unit_image_features(ctx.attacker, ctx.target_images)
    found = udiff_candidates(ctx, p)
    return {f: select_by_images(ctx, f"UnlearnDiff at {f:g}", found[f], [],
                                p.selection_images, targets) for f in ctx.budgets}


def prefixed_ids(side: TokenPrompts, prompts: list[str], k: int, placeholder: int) -> torch.Tensor:
    """``[BOS, placeholder x k, prompt tokens..., EOS, pad...]`` per prompt, cut to the context."""
    tokenizer, length = side.tokenizer, side.tokenizer.model_max_length
    ids = torch.full((len(prompts), length), tokenizer.pad_token_id)
    for row, words in enumerate(tokenizer(prompts, add_special_tokens=False).input_ids):
        tokens = [tokenizer.bos_token_id, *[placeholder] * k, *words][:length - 1]
        ids[row, :len(tokens) + 1] = torch.tensor([*tokens, tokenizer.eos_token_id])
    return ids


def udiff_candidates(ctx: AttackContext, p: UnlearnDiff) -> dict[float, list[str]]:
    """Per start, its hard prefix (as typed) before its target prompt, at each budget fraction
    of the steps."""
    pipe, device = ctx.pipe, ctx.pipe.unet.device
    generator = torch.Generator().manual_seed(ctx.seed)
    side = TokenPrompts(pipe.text_encoder, pipe.tokenizer, ctx.words)
    prompts = list(dict.fromkeys(ctx.target_prompts))
    used = {i for ids in pipe.tokenizer(prompts).input_ids for i in ids}
    placeholder = next(int(i) for i in side.vocabulary if int(i) not in used)
    rows = [prompts[i % len(prompts)] for i in range(p.candidates)]
    if p.tokens + 2 > pipe.tokenizer.model_max_length:
        raise ValueError(f"{p.tokens} prefix tokens do not fit a context of "
                         f"{pipe.tokenizer.model_max_length}; lower attack.<setting>.udiff.tokens")
    ids = prefixed_ids(side, rows, p.tokens, placeholder).to(device)
    own = [np.flatnonzero(np.array(ctx.target_prompts) == q) for q in rows]  # each row's images
    latents = image_latents(pipe, ctx.target_images)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    start = side.vocabulary[torch.randint(len(side.vocabulary), (p.candidates, p.tokens),
                                          generator=generator)].to(device)
    soft = side.table[start].detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([soft], lr=p.lr, weight_decay=p.weight_decay)
    snapshots, found = ctx.snapshots(p.steps), {}
    for step in tqdm(range(p.steps), desc="UnlearnDiff", unit="step", mininterval=5):
        picks = torch.randint(1 << 30, (p.candidates, p.batch), generator=generator).numpy()
        images = np.concatenate([own[r][picks[r] % len(own[r])] for r in range(p.candidates)])
        values = side.embed(side.project(soft.detach()), soft)
        with placeholder_embeddings(pipe.text_encoder, placeholder, values):
            context = pipe.text_encoder(ids).last_hidden_state
        context = context.repeat_interleave(p.batch, 0)
        errors, *_ = denoising_errors(pipe, scheduler, latents[torch.from_numpy(images)],
                                      context, generator)
        optimizer.zero_grad(set_to_none=True)
        errors.mean().backward()
        optimizer.step()
        for fraction in snapshots.get(step + 1, []):
            found[fraction] = [f"{prefix} {prompt}".strip() for prefix, prompt
                               in zip(side.decode(side.project(soft.detach())), rows)]
    return found
