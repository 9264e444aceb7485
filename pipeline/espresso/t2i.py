"""The text-to-image model: loading Stable Diffusion from a local folder or the Hugging Face hub,
and running it reproducibly (one seed per image, batch-independent). Needs diffusers (the
``pipeline`` extra); the filter and the checker do not.

Both settings' models are plain diffusers ``StableDiffusionPipeline`` folders or hub ids. The
mini world's ``data/world/sd`` links its ``text_encoder/`` and ``tokenizer/`` to
``data/world/clip`` (its text encoder is the mini CLIP's text tower, stored once), so it loads
with ``StableDiffusionPipeline.from_pretrained`` alone; :func:`load_t2i` reads only the text
tower's weights from that whole-CLIP checkpoint (:func:`clip_text_encoder`), so that
transformers has no unused vision-tower keys to report.
"""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from tqdm import tqdm
from transformers import CLIPConfig, CLIPTextModel

from pipeline.espresso.models import hub_loading, placement, require_vocabulary, resolve_source
from pipeline.espresso.pixels import to_uint8


def load_t2i(source: str, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """Stable Diffusion without its built-in safety checker (filtering is this project's job),
    on ``device``/``dtype`` (:func:`~pipeline.espresso.models.placement`)."""
    device, dtype = placement(device, dtype)
    source = resolve_source(source)
    with hub_loading(source):
        text_encoder = clip_text_encoder(Path(source) / "text_encoder", dtype)
        parts = {} if text_encoder is None else {"text_encoder": text_encoder}
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **parts)
    require_vocabulary(pipe.tokenizer, pipe.text_encoder.config.vocab_size, source)
    return pipe.to(device)


def clip_text_encoder(folder: Path, dtype: torch.dtype) -> CLIPTextModel | None:
    """The ``CLIPTextModel`` of a text-encoder folder that holds a whole ``CLIPModel`` (the mini
    world's ``text_encoder/`` is a link to the CLIP folder), built from the CLIP's text config
    with only the text tower's weights read: the same weights ``CLIPTextModel.from_pretrained``
    reads there, without the vision tower's keys it would report as unexpected. None for any
    other folder (a hub id, or a text encoder saved on its own, as SD's): diffusers loads it."""
    config_file = folder / "config.json"
    if not config_file.is_file() or json.loads(config_file.read_text()).get("model_type") != "clip":
        return None
    config = CLIPConfig.from_pretrained(folder)
    model = CLIPTextModel(config.text_config)
    prefix = "text_model."  # the CLIP's text tower; CLIPTextModel's keys are the rest of them
    with safe_open(folder / "model.safetensors", "pt") as weights:
        state = {key.removeprefix(prefix): weights.get_tensor(key) for key in weights.keys()
                 if key.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def sampling_schedulers() -> tuple[str, ...]:
    """The schedulers that sample correctly with these pipelines (noise-predicting SD models):
    those diffusers declares compatible with them (``KarrasDiffusionSchedulers``), but EDM's
    (for models trained with EDM's preconditioning) and those whose extra package is missing
    (``DPMSolverSDEScheduler`` needs torchsde). Consistency and flow-matching schedulers, made
    for other models, give garbage or fail mid-run: they are not among them."""
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
    from diffusers.utils import DummyObject

    return tuple(s.name for s in KarrasDiffusionSchedulers if not s.name.startswith("EDM")
                 and not isinstance(getattr(diffusers, s.name, None), (DummyObject, type(None))))


def scheduler_class(name: str) -> type:
    """diffusers' scheduler class ``name`` (e.g. "DDIMScheduler"), one of
    :func:`sampling_schedulers`; ValueError naming them if it is not."""
    if name not in sampling_schedulers():
        raise ValueError(f"unknown or unsuitable scheduler {name!r}; one of: "
                         f"{', '.join(sampling_schedulers())}")
    return getattr(diffusers, name)


def use_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's sampler for diffusers' ``name`` (e.g. "DDIMScheduler"), keeping the
    noise schedule the model was trained with."""
    pipe.scheduler = scheduler_class(name).from_config(pipe.scheduler.config)


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
        out.append(to_uint8(np.asarray(images)))
    return np.concatenate(out)
