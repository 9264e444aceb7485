"""The prior concept-removal techniques (CRTs) Espresso is compared with: each edits the UNet of a
diffusers ``StableDiffusionPipeline`` in place so that prompts with the unacceptable concept c_u
draw the acceptable anchor c_a instead. One code path serves the mini world and SD v1.4.

- ESD (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models"): fine-tunes the UNet so
  that its noise prediction for c_u is the frozen original's, guided *away* from c_u (negative
  guidance). ESD-x trains the cross-attention (``attn2``) parameters, ESD-u all the others.
- UCE (Gandikota et al. 2024, "Unified Concept Editing in Diffusion Models"): a closed-form
  least-squares edit of every cross-attention key/value projection, mapping c_u's text states to
  what c_a's produced, while preserved concepts keep their outputs.
- CA (Kumari et al. 2023, "Ablating Concepts in Text-to-Image Diffusion Models"), model-based:
  fine-tunes the cross-attention key/value projections so that the UNet's prediction on images
  of c_a, prompted with c_u, matches the frozen original's prediction prompted with c_a.

The iterative edits (ESD, CA) share :func:`fine_tune`: per-step seeded randomness and atomic
checkpoints, so that an interrupted edit resumes to the very weights of an uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

if TYPE_CHECKING:  # the budgets of edit.<setting> (pipeline.schema)
    from pipeline.schema import Ca, Esd


@dataclass
class EditTask:
    """What an edit gets."""
    pipe: StableDiffusionPipeline  # unedited; the edit changes pipe.unet in place (text encoder
    #                                and VAE stay frozen)
    unacceptable: str              # c_u concept text, e.g. "Zorbo"
    acceptable: str                # c_a concept text, e.g. "a star"
    pairs: list[tuple[str, str]]   # training prompt pairs (prompt with c_u, same prompt with c_a)
    anchor_images: np.ndarray      # uint8 N x H x W x 3: the UNEDITED model's images of the
    #                                pairs' acceptable prompts
    anchor_pairs: list[int]        # anchor_images[i] was generated from pairs[anchor_pairs[i]][1]
    preserve: list[str]            # other concept texts whose mapping must be kept (UCE)
    seed: int
    size: int                      # image size the model generates at (mini 32, paper 512)
    steps: int                     # sampler steps (ESD's partial sampling: DDIM with this many)
    checkpoint: Path | None = None  # folder for an iterative edit's resume state (None: none)


def _cross_attention(name: str) -> bool:
    return ".attn2." in name


def _cross_attention_kv(name: str) -> bool:
    return ".attn2.to_k." in name or ".attn2.to_v." in name


#: Which UNet parameters each CRT may change. ESD-u's "non-cross-attention" parameters are read as
#: everything but ``attn2`` (the ESD paper's wording; its release also leaves the time embedding
#: and output layer frozen). CA's "cross-attn" group and UCE are the key/value projections of
#: ``attn2``; UCE edits their weights (SD's have no bias).
TRAINABLE: dict[str, Callable[[str], bool]] = {
    "esd_x": _cross_attention,
    "esd_u": lambda name: not _cross_attention(name),
    "uce": lambda name: _cross_attention_kv(name) and name.endswith(".weight"),
    "ca": _cross_attention_kv,
}


def trainable_names(name: str, unet: torch.nn.Module) -> list[str]:
    """Names of the UNet parameters that the CRT ``name`` may change."""
    if name not in TRAINABLE:
        raise KeyError(f"unknown CRT {name!r}; known: {', '.join(TRAINABLE)}")
    return [n for n, _ in unet.named_parameters() if TRAINABLE[name](n)]


@torch.no_grad()
def encode(pipe: StableDiffusionPipeline, texts: list[str]) -> torch.Tensor:
    """Text-encoder states (``len(texts) x max_length x width``, fp32, on the UNet's device) as
    the pipeline conditions its UNet on them: padded to the tokenizer's full length."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    states = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]
    return states.to(pipe.unet.device, torch.float32)


#: A step's loss: (student UNet, frozen teacher UNet, the step's generator) -> scalar tensor.
StepLoss = Callable[[torch.nn.Module, torch.nn.Module, torch.Generator], torch.Tensor]
PARAMS_FILE, STATE_FILE = "trainable.safetensors", "state.pt"


def fine_tune(task: EditTask, p: Esd | Ca, name: str, loss: StepLoss, desc: str) -> dict:
    """Train ``name``'s parameters of ``task.pipe.unet`` in place for ``p.steps`` Adam steps of
    ``loss``, against a frozen copy of the unedited UNet (the teacher).

    Step ``k`` draws all its randomness from ``Generator().manual_seed(task.seed + k)`` and the
    UNets have no dropout, so a run resumed from a checkpoint of ``task.checkpoint`` (written
    every ``p.checkpoint_every`` steps) ends with the same weights as one never interrupted.
    Training is in fp32 (an fp16 UNet is converted for it, and back); the UNet is left frozen.
    """
    unet = task.pipe.unet
    dtype = unet.dtype
    _cast(unet, torch.float32).eval().requires_grad_(False)
    teacher = copy.deepcopy(unet)
    names = trainable_names(name, unet)
    owned = dict(unet.named_parameters())
    params = {n: owned[n].requires_grad_(True) for n in names}
    optimizer = torch.optim.Adam(params.values(), lr=p.lr)
    fingerprint = _fingerprint(task, p, name)
    start, losses = _resume(task.checkpoint, params, optimizer, fingerprint, p.steps)
    for step in tqdm(range(start, p.steps), initial=start, total=p.steps, desc=desc,
                     mininterval=5):
        value = loss(unet, teacher, torch.Generator().manual_seed(task.seed + step))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(value.item())
        if task.checkpoint is not None and (step + 1) % p.checkpoint_every == 0:
            _save(task.checkpoint, params, optimizer, fingerprint, step + 1, losses)
    _cast(unet.requires_grad_(False), dtype)
    window = max(1, len(losses) // 10)
    return {"trained_parameters": sum(q.numel() for q in params.values()),
            "trained_tensors": len(params), "steps": len(losses), "resumed_from": start,
            "first_loss": float(np.mean(losses[:window])) if losses else None,
            "final_loss": float(np.mean(losses[-window:])) if losses else None}


def _cast(unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``unet`` in ``dtype``; left alone when already there (diffusers warns on any cast)."""
    return unet if unet.dtype == dtype else unet.to(dtype)


def _fingerprint(task: EditTask, p: Esd | Ca, name: str) -> str:
    """What a checkpoint must have been made with to be resumed: the same CRT, concept, seed and
    budget (the step count aside: a longer run may continue a shorter one's checkpoint)."""
    budget = p.model_dump(exclude={"steps", "checkpoint_every"})
    return json.dumps({"crt": name, "budget": budget, "seed": task.seed,
                       "unacceptable": task.unacceptable, "acceptable": task.acceptable,
                       "pairs": [list(pair) for pair in task.pairs], "size": task.size,
                       "sampler_steps": task.steps}, sort_keys=True)


def _save(folder: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
          fingerprint: str, step: int, losses: list[float]) -> None:
    """Both files written under temporary names, then renamed over the old ones: a crash leaves
    whole files (the step recorded in each tells if it fell between the two renames)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"step": str(step), "fingerprint": fingerprint}
    save_file({n: q.detach().cpu().contiguous() for n, q in params.items()},
              folder / f"{PARAMS_FILE}.tmp", metadata=meta)
    torch.save({"step": step, "fingerprint": fingerprint, "optimizer": optimizer.state_dict(),
                "losses": torch.tensor(losses, dtype=torch.float64)}, folder / f"{STATE_FILE}.tmp")
    os.replace(folder / f"{PARAMS_FILE}.tmp", folder / PARAMS_FILE)
    os.replace(folder / f"{STATE_FILE}.tmp", folder / STATE_FILE)


def _resume(folder: Path | None, params: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer, fingerprint: str,
            steps: int) -> tuple[int, list[float]]:
    """The step to start at and the losses so far, after loading a matching checkpoint from
    ``folder`` into ``params`` and ``optimizer``; (0, []) when there is none to resume (no
    folder or files, another run's, one beyond ``steps``, or the two files of different steps)."""
    if folder is None or not (Path(folder) / PARAMS_FILE).is_file() \
            or not (Path(folder) / STATE_FILE).is_file():
        return 0, []
    state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
    with safe_open(Path(folder) / PARAMS_FILE, "pt") as saved:
        meta = saved.metadata()
        if (state["fingerprint"] != fingerprint or meta["fingerprint"] != fingerprint
                or int(meta["step"]) != state["step"] or state["step"] > steps
                or set(saved.keys()) != set(params)):
            return 0, []
        with torch.no_grad():
            for n, q in params.items():
                q.copy_(saved.get_tensor(n))
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["losses"].tolist()


# the edits import the helpers above from this package
from pipeline.crts.ca import ca  # noqa: E402
from pipeline.crts.esd import esd_u, esd_x  # noqa: E402
from pipeline.crts.uce import uce  # noqa: E402
from pipeline.registry import CRTS, implemented  # noqa: E402

#: Every CRT: ``EDITS[name](task, budget)`` edits ``task.pipe.unet`` in place and returns a small
#: JSON-able record of what it did (``budget``: its model of ``pipeline.schema.EditBudgets``).
EDITS: dict[str, Callable[[EditTask, Any], dict]] = implemented(CRTS, {
    "esd_x": esd_x, "esd_u": esd_u, "uce": uce, "ca": ca}, "pipeline.crts.EDITS")
