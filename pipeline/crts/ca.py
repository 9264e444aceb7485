"""CA, Concept Ablation (Kumari et al. 2023), model-based variant: fine-tunes the UNet so that,
on noised latents of images of c_a, its prediction prompted with the c_u prompt matches the
frozen original's prediction prompted with the paired c_a prompt; c_u prompts then denoise like
c_a prompts. Only the cross-attention key/value projections train (the paper's "cross-attn"
parameter group). ``anchor_weight`` > 0 adds the standard denoising loss on the c_a prompt (the
release's optional prior preservation), which keeps the anchor concept itself intact.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from pipeline.crts import EditTask, encode, fine_tune

if TYPE_CHECKING:  # its budget of edit.<setting> (pipeline.schema)
    from pipeline.schema import Ca

#: Anchor images VAE-encoded at a time.
ENCODE_BATCH = 32


@torch.no_grad()
def anchor_latents(pipe, images: np.ndarray) -> torch.Tensor:
    """The VAE's latent means of uint8 ``N x H x W x 3`` images, scaled as the UNet sees them
    (fp32, on the UNet's device)."""
    vae = pipe.vae
    out = []
    for start in range(0, len(images), ENCODE_BATCH):
        pixels = torch.from_numpy(images[start:start + ENCODE_BATCH]).permute(0, 3, 1, 2)
        pixels = (pixels.float() / 127.5 - 1).to(vae.device, vae.dtype)
        out.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out).to(pipe.unet.device, torch.float32)


def ca(task: EditTask, p: Ca) -> dict:
    """``p``: steps, lr, batch (anchor images per step), anchor_weight, checkpoint_every."""
    pipe = task.pipe
    device = pipe.unet.device
    latents = anchor_latents(pipe, task.anchor_images)
    prompts = sorted({text for i in set(task.anchor_pairs) for text in task.pairs[i]})
    states = dict(zip(prompts, encode(pipe, prompts)))
    unacceptable = torch.stack([states[task.pairs[i][0]] for i in task.anchor_pairs])
    acceptable = torch.stack([states[task.pairs[i][1]] for i in task.anchor_pairs])
    noiser = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss(student: torch.nn.Module, teacher: torch.nn.Module,
             generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(latents), (p.batch,), generator=generator)
        t = torch.randint(noiser.config.num_train_timesteps, (p.batch,), generator=generator)
        noise = torch.randn((p.batch,) + latents.shape[1:], generator=generator).to(device)
        clean, t, pick = latents[pick.to(device)], t.to(device), pick.to(device)
        x = noiser.add_noise(clean, noise, t)
        with torch.no_grad():
            target = teacher(x, t, encoder_hidden_states=acceptable[pick]).sample
        value = F.mse_loss(student(x, t, encoder_hidden_states=unacceptable[pick]).sample, target)
        if p.anchor_weight:
            anchor = student(x, t, encoder_hidden_states=acceptable[pick]).sample
            truth = denoising_target(noiser, clean, noise, t)
            value = value + p.anchor_weight * F.mse_loss(anchor, truth)
        return value

    return fine_tune(task, p, "ca", loss, "CA")


def denoising_target(noiser: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict for ``clean`` noised with ``noise`` at ``t``, in its
    own output space (the mini world's UNet predicts velocity, SD v1.4's noise)."""
    kind = noiser.config.prediction_type
    if kind == "v_prediction":
        return noiser.get_velocity(clean, noise, t)
    return clean if kind == "sample" else noise
