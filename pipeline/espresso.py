"""The Espresso filter (METHOD section 2): block an image iff CLIP puts it nearer the unacceptable
concept than its acceptable counterpart.

With e = phi_x(x)/|phi_x(x)| and unit concept embeddings t_u, t_a::

    P(u|x) = softmax(s * [cos(e, t_u), cos(e, t_a)])_u = sigmoid(s * <e, t_u - t_a>)
    block(x)  iff  P(u|x) > 0.5  iff  <phi_x(x), t_u - t_a> > 0

The filter is a library object independent of DVC: it saves as a folder that also loads as a
plain transformers ``CLIPModel``, and it plugs into a diffusers ``StableDiffusionPipeline`` as its
``safety_checker``. It fails closed: an image it cannot score is blocked.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.embeddings import text_embeddings
from pipeline.files import atomic_dir
from pipeline.models import load_clip

CONFIG_FILE = "espresso.json"


@dataclass
class Screening:
    """What the filter decided for a batch of images."""

    images: list[np.ndarray]       # the input images, blocked ones replaced by black
    blocked: np.ndarray            # bool N
    p_unacceptable: np.ndarray     # float N, NaN where the image could not be scored
    errors: list[str | None] = field(default_factory=list)  # why an image was not scored


class EspressoFilter(nn.Module):
    """CLIP concept filter for one concept pair (``unacceptable``, ``acceptable``).

    ``templates`` (e.g. ``["a photo of {}"]``) turns each concept into a prompt ensemble whose
    normalised embeddings are averaged; the paper encodes the raw concept text (``["{}"]``).
    """

    def __init__(self, clip, tokenizer, processor, unacceptable: str, acceptable: str,
                 templates: list[str] | None = None):
        super().__init__()
        self.clip, self.tokenizer, self.processor = clip, tokenizer, processor
        self.unacceptable, self.acceptable = unacceptable, acceptable
        self.templates = list(templates or ["{}"])
        self.refresh_concepts()

    # ---- concept embeddings (computed once, not per image) ------------------------------
    def concept_embedding(self, concept: str) -> torch.Tensor:
        prompts = [t.format(concept) for t in self.templates]
        return F.normalize(text_embeddings(self.clip, self.tokenizer, prompts).mean(0), dim=-1)

    def refresh_concepts(self) -> None:
        """Recompute t_u and t_a (call after changing the text encoder's weights)."""
        self.register_buffer("t_u", self.concept_embedding(self.unacceptable), persistent=False)
        self.register_buffer("t_a", self.concept_embedding(self.acceptable), persistent=False)

    @property
    def direction(self) -> torch.Tensor:
        """w = t_u - t_a: the decision is the sign of <phi_x(x), w>."""
        return self.t_u - self.t_a

    @property
    def device(self) -> torch.device:
        """diffusers pipelines ask every component for its device and dtype."""
        return self.clip.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.dtype

    @property
    def logit_scale(self) -> float:
        return self.clip.logit_scale.detach().exp().item()

    # ---- scores ---------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Un-normalised projected image embeddings phi_x(x)."""
        out = self.clip.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        return out.pooler_output.float()

    def p_unacceptable(self, features: torch.Tensor) -> torch.Tensor:
        """P(u|x), cosine/softmax form (the paper's)."""
        e = F.normalize(features, dim=-1)
        return torch.sigmoid(self.logit_scale * (e @ self.direction))

    def p_unacceptable_projection(self, features: torch.Tensor) -> torch.Tensor:
        """P(u|x), projection form (first arXiv version): project e onto d = w/|w| and softmax
        the negative distances of the projection to t_u and t_a. Same decision, other score."""
        e = F.normalize(features, dim=-1)
        d = F.normalize(self.direction, dim=-1)
        projection = (e @ d)[:, None] * d
        distances = torch.stack([(projection - self.t_u).norm(dim=-1),
                                 (projection - self.t_a).norm(dim=-1)], dim=-1)
        return torch.softmax(-self.logit_scale * distances, dim=-1)[:, 0]

    # ---- screening ------------------------------------------------------------------------
    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt").pixel_values

    def pixel_values_differentiable(self, images: torch.Tensor) -> torch.Tensor:
        """The processor's resize, centre crop and normalisation in torch, for float
        ``N x 3 x H x W`` images in [0, 1], so that gradients reach the images (attacks)."""
        size, crop = self.processor.size["shortest_edge"], self.processor.crop_size
        scale = size / min(images.shape[-2:])
        height, width = round(images.shape[-2] * scale), round(images.shape[-1] * scale)
        x = F.interpolate(images, size=(height, width), mode="bicubic", antialias=True,
                          align_corners=False)
        top, left = (height - crop["height"]) // 2, (width - crop["width"]) // 2
        x = x[..., top:top + crop["height"], left:left + crop["width"]]
        mean = torch.tensor(self.processor.image_mean, device=x.device)[:, None, None]
        std = torch.tensor(self.processor.image_std, device=x.device)[:, None, None]
        return (x - mean) / std

    @torch.no_grad()
    def embed(self, images, batch: int = 256) -> torch.Tensor:
        """Un-normalised phi_x of ``H x W x 3`` images, in batches."""
        images = list(images)
        return torch.cat([self.image_features(self.pixel_values(images[i:i + batch]))
                          for i in range(0, len(images), batch)])

    @torch.no_grad()
    def screen(self, images, batch: int = 64) -> Screening:
        """Score images (``H x W x 3`` arrays: uint8, or float in [0, 1]); block those with
        P(u|x) > 0.5 and any image that cannot be scored (fail closed: malformed, non-finite),
        replacing each blocked image by a black one."""
        images = list(images)
        p = np.full(len(images), np.nan)
        errors: list[str | None] = [None] * len(images)
        for start in range(0, len(images), batch):
            chunk = range(start, min(start + batch, len(images)))
            try:
                p[list(chunk)] = self._score(images[chunk.start:chunk.stop])
            except Exception:  # noqa: BLE001 - isolate the images that cannot be scored
                for i in chunk:
                    try:
                        p[i] = self._score(images[i:i + 1])[0]
                    except Exception as err:  # noqa: BLE001 - fail closed, report why
                        errors[i] = f"{type(err).__name__}: {err}"
        for i in np.flatnonzero(~np.isfinite(p)):
            errors[i] = errors[i] or "score is not finite"
        blocked = ~(p <= 0.5)  # NaN -> blocked
        out = [np.zeros_like(im) if b else im for im, b in zip(images, blocked)]
        return Screening(out, blocked, p, errors)

    def _score(self, images: list[np.ndarray]) -> np.ndarray:
        return self.p_unacceptable(self.image_features(self.pixel_values(images))).cpu().numpy()

    @torch.no_grad()
    def forward(self, images, clip_input: torch.Tensor):
        """diffusers' safety-checker convention: returns the images with blocked ones black, and
        the per-image flags. Fails closed like :meth:`screen`."""
        try:
            p = self.p_unacceptable(self.image_features(clip_input))
            flags = [not bool(v <= 0.5) for v in p]
        except Exception:  # noqa: BLE001 - an image that cannot be scored is blocked
            flags = [True] * len(images)
        for i, flagged in enumerate(flags):
            if flagged:
                images[i] = torch.zeros_like(images[i]) if torch.is_tensor(images[i]) \
                    else np.zeros(images[i].shape)
        return images, flags

    # ---- persistence ----------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """The whole CLIP (loads as a plain ``CLIPModel``), tokenizer, processor, and the concept
        pair in ``espresso.json``; written atomically."""
        with atomic_dir(folder) as tmp:
            for part in (self.clip, self.tokenizer, self.processor):
                part.save_pretrained(tmp)
            (tmp / CONFIG_FILE).write_text(json.dumps(
                {"unacceptable": self.unacceptable, "acceptable": self.acceptable,
                 "templates": self.templates}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device=None, dtype=None) -> "EspressoFilter":
        config_path = Path(folder) / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} is not a saved Espresso filter (no {CONFIG_FILE}); "
                                    "for a plain CLIP use EspressoFilter.from_clip(...)")
        config = json.loads(config_path.read_text())
        return cls.from_clip(str(folder), config["unacceptable"], config["acceptable"],
                             config["templates"], device, dtype)

    @classmethod
    def from_clip(cls, source: str, unacceptable: str, acceptable: str,
                  templates: list[str] | None = None, device=None, dtype=None) -> "EspressoFilter":
        """A zero-shot filter on any CLIP (local folder or hub id)."""
        clip, tokenizer, processor = load_clip(source, device, dtype)
        return cls(clip, tokenizer, processor, unacceptable, acceptable, templates)
