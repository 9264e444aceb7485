"""ESD, Erased Stable Diffusion (Gandikota et al. 2023): negative-guidance fine-tuning.

Each step samples a partly denoised latent x_k from the model being edited, prompted with c_u,
and teaches it to predict, for c_u, what the frozen original predicts unconditionally, pushed
away from c_u: ``eps(x_k, "") - eta * (eps(x_k, c_u) - eps(x_k, ""))``. As in the paper, the
prompt is the concept text c_u alone. The target is a linear combination of the model's own
outputs, so it is formed the same way whether the UNet predicts noise or velocity.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from pipeline.crts import EditTask, encode, fine_tune

if TYPE_CHECKING:  # its budget of edit.<setting> (pipeline.schema)
    from pipeline.schema import Esd


def esd_x(task: EditTask, p: Esd) -> dict:
    """ESD-x: trains the cross-attention parameters only (the paper's choice for styles and
    concepts named in the prompt)."""
    return _esd(task, p, "esd_x", "ESD-x")


def esd_u(task: EditTask, p: Esd) -> dict:
    """ESD-u: trains every UNet parameter but the cross-attention (the paper's choice for
    concepts that should go whatever the prompt)."""
    return _esd(task, p, "esd_u", "ESD-u")


def _esd(task: EditTask, p: Esd, name: str, desc: str) -> dict:
    """``p``: steps, lr, eta (negative guidance), sample_guidance (the classifier-free guidance
    of the partial sampling), batch (latents per step), checkpoint_every."""
    pipe = task.pipe
    device = pipe.unet.device
    empty, concept = encode(pipe, ["", task.unacceptable])
    sampler = DDIMScheduler.from_config(pipe.scheduler.config)
    sampler.set_timesteps(task.steps, device=device)
    side = task.size // pipe.vae_scale_factor
    shape = (p.batch, pipe.unet.config.in_channels, side, side)
    both = torch.stack([empty, concept]).repeat_interleave(p.batch, dim=0)

    def paired(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple:
        """The (unconditional, c_u) predictions for every latent of ``x``, in one batch."""
        return unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)

    def loss(student: torch.nn.Module, teacher: torch.nn.Module,
             generator: torch.Generator) -> torch.Tensor:
        k = int(torch.randint(task.steps, (1,), generator=generator))
        x = (torch.randn(shape, generator=generator) * sampler.init_noise_sigma).to(device)
        with torch.no_grad():
            for t in sampler.timesteps[:k]:
                model_input = sampler.scale_model_input(x, t)
                uncond, cond = paired(student, model_input, t)
                guided = uncond + p.sample_guidance * (cond - uncond)
                x = sampler.step(guided, t, x).prev_sample
            t = sampler.timesteps[k]
            x = sampler.scale_model_input(x, t)
            uncond, cond = paired(teacher, x, t)
            target = uncond - p.eta * (cond - uncond)
        prediction = student(x, t, encoder_hidden_states=both[p.batch:]).sample
        return F.mse_loss(prediction, target)

    return fine_tune(task, p, name, loss, desc)
