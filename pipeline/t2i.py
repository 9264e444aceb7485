"""Running a text-to-image pipeline reproducibly: one seed per image, batch-independent."""
from __future__ import annotations

import diffusers
import numpy as np
import torch
from tqdm import tqdm


def use_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's sampler for diffusers' ``name`` (e.g. "DDIMScheduler"), keeping the
    noise schedule the model was trained with."""
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None or not name.endswith("Scheduler"):
        raise ValueError(f"unknown diffusers scheduler {name!r} (e.g. DDIMScheduler, "
                         "DPMSolverMultistepScheduler, PNDMScheduler)")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
             size: int | None = None, batch: int = 32, progress: bool = False) -> np.ndarray:
    """uint8 ``N x H x W x 3`` images, image ``i`` from ``prompts[i]`` with its own generator
    seeded ``seeds[i]`` (so an image does not depend on what else is in its batch)."""
    out = []
    starts = range(0, len(prompts), batch)
    for start in tqdm(starts, desc="generate", disable=not progress, unit="batch"):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + batch]]
        images = pipe(prompts[start:start + batch], height=size, width=size,
                      num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, output_type="np").images
        out.append((np.asarray(images) * 255).round().astype(np.uint8))
    return np.concatenate(out)
