"""Espresso for many concepts at once (METHOD section 9): one CLIP image tower and a table of
concept directions.

Espresso's fine-tuning changes only CLIP's text side, so a trained concept is fully described by
its two unit vectors t_u, t_a in the image-embedding space of the *unchanged* image tower. N
concepts then cost one image embedding e and an ``N x d`` product::

    P(u_k|x) = sigmoid(s_k * <e/|e|, t_u,k - t_a,k>)      concept k fires iff P(u_k|x) > cut_k

with s_k the logit scale of the CLIP concept k came from, and cut_k the paper's 0.5 unless it
was calibrated for a chosen false-positive rate (:meth:`ConceptChecker.calibrate`). A concept
with everyday anchors t_n,k (the unit embeddings of ordinary prompts that name none of the
concepts, ``M_k x d``) fires only where also sigmoid(s_k (<e, t_u,k> - max_j <e, t_n,k,j>)) >
everyday_cut_k: an image of neither c_u nor c_a is nearer some everyday text than c_u, where the
paper's rule alone gives it an arbitrary verdict (docs/method.md, "Images of neither concept").
Where the concept also has in-context texts t_c,k (the everyday texts with c_u put in), <e, t_u,k>
there is the nearest of t_u,k and t_c,k: whole captions on both sides of the gate;
the everyday cuts are set together for a whole-checker false-positive rate on everyday images
with a finite-sample guarantee (:meth:`ConceptChecker.calibrate_everyday`). An image is blocked
where any concept fires. With cut 0.5 each concept's decision is exactly the
single-concept :class:`~pipeline.espresso.filter.EspressoFilter`'s (same tower, same vectors,
same rule); the checker holds no text tower, so it costs what diffusers' own safety checker costs.

It drops into a diffusers ``StableDiffusionPipeline`` as ``safety_checker=`` (with
``feature_extractor=checker.processor``): the pipeline's ``nsfw_content_detected`` is the
per-image block, and ``checker.last_result`` keeps the per-concept scores and which concepts
fired (of the calling thread's last call). A loaded folder is checked: its concept table
(schema, 0 < cut < 1, logit scale > 0), its processor (CLIP's preprocessing at the tower's
size) and its weights (safetensors only); a folder that fails is refused in one line. It fails closed as the single filter does. Saved in the Hugging Face style
(``huggingface_hub.ModelHubMixin``): ``save_pretrained`` / ``from_pretrained`` (a local folder or
a hub id) / ``push_to_hub``; the folder::

    config.json               the concept table: texts, cuts, calibration, provenance, logit scales;
                              the everyday calibration
    concepts.safetensors      t_u, t_a, one row per concept; t_n.K, the everyday anchors of
                              concept K (M x d), and t_c.K, its in-context texts (M' x d), for
                              each concept that has them
    image_encoder/            transformers CLIPVisionModelWithProjection (safetensors)
    feature_extractor/        transformers CLIPImageProcessor
    README.md                 model card

This module needs only torch, transformers, huggingface_hub, safetensors, numpy and pillow.
"""
from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelHubMixin, snapshot_download
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection)

from pipeline.espresso.files import sha256_file
from pipeline.espresso.filter import (MIN_DIRECTION_NORM, ConceptScreen, EspressoFilter,
                                      _score, _short, blocks, records_frame, result_repr,
                                      thread_last)
from pipeline.espresso.models import (ModelNotAvailableError, hub_loading, load_clip, placement,
                                      quiet_libraries, require_weights_fit, resolve_source)

FORMAT = "espresso-concept-checker"
FORMAT_VERSION = 4
#: Versions this library reads: 1 has no everyday anchors, 2 no file digests (its files are
#: checked for fit and sense, but a changed setting that keeps both is not seen), 3 no
#: in-context texts.
READ_VERSIONS = (1, 2, 3, 4)
CONFIG_NAME = "config.json"
VECTORS_FILE = "concepts.safetensors"
IMAGE_ENCODER, FEATURE_EXTRACTOR = "image_encoder", "feature_extractor"
#: The paper's decision, P(u|x) > 0.5, the default cut of every concept.
PAPER_CUT = 0.5
#: CLIP's own bound on its logit scale (its training clamps exp(logit_scale) at 100); a larger
#: scale only saturates P(u|x), and an overflowing one turns a tie into NaN.
MAX_LOGIT_SCALE = 100.0
#: How far a saved unit vector's norm may be from 1 (float32 rounding is ~1e-7); a vector of
#: another length (zero, scaled) changes every score.
UNIT_TOLERANCE = 1e-3
#: A concept's name: it becomes a CSV value, a column and a file name where reports are written.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
MODEL_CARD = """---
{{ card_data }}
---

# Espresso concept checker ({{ count }} concepts)

Espresso (Das, Duddu, Zhang, Asokan, ACM CODASPY 2025, [arXiv 2404.19227](https://arxiv.org/abs/2404.19227))
for several concepts on one CLIP image tower: concept k fires on an image x where
P(u_k|x) = sigmoid(s_k <e, t_u,k - t_a,k>) exceeds its cut (the paper's 0.5 unless calibrated for
a target false-positive rate) and, for a concept with an everyday anchor t_n,k, also
sigmoid(s_k (<e, t_u,k> - max_j <e, t_n,k,j>)) over its everyday texts j exceeds its everyday
cut (with in-context texts t_c,k, the everyday texts with c_u put in, <e, t_u,k> is the nearest
of t_u,k and t_c,k); the image is blocked where any concept fires. Images it cannot score are
blocked (fail closed).

{{ everyday }}

| concept | unacceptable | acceptable | cut | everyday cut | source |
|---|---|---|---|---|---|
{{ concepts }}

```python
from pipeline.espresso import ConceptChecker
checker = ConceptChecker.from_pretrained("<this folder or repo id>")
result = checker.check(images)   # .blocked, .p_unacceptable, .p_vs_everyday (N x K), .fired
```

It is also a diffusers `safety_checker` (with `feature_extractor=checker.processor`).
`config.json` records each concept's texts, cut, calibration and provenance.
"""


@dataclass
class CheckerConcept:
    """One row of the concept table. ``calibration`` says how ``cut`` was chosen (None: the
    paper's 0.5); ``provenance`` where the vectors came from (experiment, commit, params)."""

    name: str
    unacceptable: str
    acceptable: str
    t_u: torch.Tensor
    t_a: torch.Tensor
    logit_scale: float
    cut: float = PAPER_CUT
    calibration: dict | None = None
    provenance: dict = field(default_factory=dict)
    t_n: torch.Tensor | None = None    # the everyday anchors, M x d (None: the paper's rule)
    everyday_cut: float | None = None  # its cut, in (0, 1) where there is an anchor
    everyday: dict | None = None       # where t_n came from (texts, how many)
    t_c: torch.Tensor | None = None    # the in-context texts, M' x d (None: t_u alone)

    def record(self) -> dict:
        """The row as JSON (the vectors go to ``concepts.safetensors``; ``in_context`` counts
        the rows of t_c)."""
        row = {k: v for k, v in asdict(self).items() if k not in ("t_u", "t_a", "t_n", "t_c")}
        return {**row, "in_context": None if self.t_c is None else len(self.t_c)}


@dataclass
class CheckResult:
    """What the checker decided for a batch of N images and K concepts."""

    images: list                 # the inputs (as given), each blocked one replaced by a black one
    blocked: np.ndarray          # bool N: any concept fired (or the image could not be scored)
    p_unacceptable: np.ndarray   # float N x K, NaN where the image could not be scored
    fired: np.ndarray            # bool N x K: P(u_k|x) > cut_k (every concept, if unscored)
    concepts: list[str]          # the K concept names, in column order
    errors: list[str | None] = field(default_factory=list)  # why an image was not scored
    p_vs_everyday: np.ndarray | None = None  # float N x K: P(u_k|x) against the everyday
                                 # anchor t_n,k (1 for a concept without one), NaN if unscored

    @property
    def unscored(self) -> np.ndarray:
        """bool N: no score (invalid or ambiguous form, or the model failed); always blocked."""
        return np.isnan(self.p_unacceptable).any(1)

    #: The columns of :meth:`to_records` / :meth:`to_pandas`, one row per image and concept
    #: (those of ``python -m pipeline.screen``'s CSV, the image's index for its path).
    COLUMNS = ("image", "concept", "p_unacceptable", "p_vs_everyday", "fired", "blocked",
               "error")

    def fired_concepts(self, i: int) -> list[str]:
        """The names of the concepts that fired on image ``i``."""
        return [name for name, f in zip(self.concepts, self.fired[i]) if f]

    def _error(self, i: int) -> str | None:
        return self.errors[i] if i < len(self.errors) else None

    def to_records(self) -> list[dict]:
        """One dict per image and concept (``COLUMNS``), image by image; ``p_unacceptable`` is
        None where the image was not scored, and ``error`` says why."""
        gate = self.p_vs_everyday
        return [{"image": i, "concept": name, "p_unacceptable": _score(self.p_unacceptable[i, k]),
                 "p_vs_everyday": None if gate is None else _score(gate[i, k]),
                 "fired": bool(self.fired[i, k]), "blocked": bool(self.blocked[i]),
                 "error": self._error(i)}
                for i in range(len(self.blocked)) for k, name in enumerate(self.concepts)]

    def to_pandas(self):
        """:meth:`to_records` as a pandas DataFrame (needs pandas)."""
        return records_frame(self.to_records(), self.COLUMNS)

    def _line(self, i: int) -> str:
        if self.unscored[i]:
            return f"blocked  unscored: {_short(self._error(i) or 'no score')}"
        p = self.p_unacceptable[i]
        if self.blocked[i]:
            return "blocked  " + ", ".join(f"{self.concepts[k]} {p[k]:.3f}"
                                           for k in np.flatnonzero(self.fired[i]))
        top = int(np.argmax(p))
        return f"passed   highest {self.concepts[top]} {p[top]:.3f}"

    def __repr__(self) -> str:
        n, blocked = len(self.blocked), int(np.sum(self.blocked))
        return result_repr(f"CheckResult({n} images x {len(self.concepts)} concepts: {blocked} "
                           f"blocked, {n - blocked} passed)",
                           [self._line(i) for i in range(n)], np.asarray(self.blocked))


def cut_for_fpr(negatives: np.ndarray, target_fpr: float) -> float:
    """The lowest cut on P(u|x) at which at most ``target_fpr`` of ``negatives`` (the scores of
    validation images that do not show the concept) exceed it: the (k+1)-th highest score, k =
    floor(target_fpr * n) (ties only lower the rate)."""
    negatives = np.sort(np.asarray(negatives, float))[::-1]
    if not 0 < target_fpr < 1:
        raise ValueError(f"target false-positive rate {target_fpr}: give a rate in (0, 1)")
    if len(negatives) == 0 or not np.isfinite(negatives).all():
        raise ValueError("calibration needs the finite scores of at least one validation image "
                         "that does not show the concept")
    allowed = int(np.floor(target_fpr * len(negatives)))
    return float(negatives[allowed]) if allowed < len(negatives) else float(negatives[-1]) - 1e-9


def conformal_everyday_cuts(rule_fires: np.ndarray, gate: np.ndarray, unscored: np.ndarray,
                            groups: np.ndarray, anchored: list[int], target_fpr: float,
                            names: list[str], seed: int = 0
                            ) -> tuple[float, dict[int, float], dict]:
    """The everyday cuts of :meth:`ConceptChecker.calibrate_everyday` from the scores of the
    everyday images: ``rule_fires`` and ``gate`` (``N x K``), ``unscored`` (N), ``groups`` (N).
    Returns lambda, the cut per anchored column, and the split's sizes.

    The groups are split in half at random. On the first half (the reference) each anchored
    concept k gets its scale: G_k(q) = the share of the reference images on which k's
    c_u-vs-c_a rule fires that have a gate score <= q; above the highest such score L_k (0.5
    where it never fires) the scale goes on as 1 + logit(q) - logit(L_k), so that a score
    beyond every reference image's is still ordered. Concept k is gated open where
    G_k(q) > lambda, so at one lambda every concept fires on the same share of the everyday
    images its rule fires on: the budget goes to the concepts that need it, and one whose rule
    seldom fires on everyday images keeps its c_u images. On the second half (calibration), each group's
    score is the least lambda that passes all its images (infinite for an unscored image or a
    concept without anchors that fires), and lambda is the ceil((n + 1)(1 - target))-th
    smallest of the n scores: the scales do not depend on these groups, so a new group
    exchangeable with them is blocked with probability at most ``target_fpr``."""
    if not 0 < target_fpr < 1:
        raise ValueError(f"target false-positive rate {target_fpr}: give a rate in (0, 1)")
    if len(groups) != len(unscored):
        raise ValueError(f"{len(groups)} groups for {len(unscored)} everyday images")
    units = np.unique(groups)
    rng = np.random.default_rng(seed)
    reference_units = set(rng.permutation(units)[:len(units) // 2].tolist())
    reference = np.array([g in reference_units for g in groups.tolist()])
    calibration_units = [g for g in units if g not in reference_units]
    rank = int(np.ceil((len(calibration_units) + 1) * (1 - target_fpr)))
    if rank > len(calibration_units):
        needed = 2 * (int(np.ceil(1 / target_fpr)) - 1)
        raise ValueError(f"{len(units)} everyday groups cannot calibrate a false-positive rate "
                         f"of {target_fpr:g}: give at least {needed} groups (prompts or images; "
                         "half of them set the concepts' scales)")
    scales = {k: np.sort(gate[reference & rule_fires[:, k], k]) for k in anchored}
    tops = {k: _logit(scale[-1] if len(scale) else 0.5) for k, scale in scales.items()}
    least = np.where(unscored, np.inf, 0.0)  # per image: the least lambda that passes it
    for k in range(rule_fires.shape[1]):
        if k in scales:
            scale = scales[k]
            shares = (np.searchsorted(scale, gate[:, k], side="right") / max(len(scale), 1)
                      if len(scale) else np.ones(len(least)))
            shares = shares + np.maximum(0.0, _logit(gate[:, k]) - tops[k])
        else:
            shares = np.full(len(least), np.inf)
        least = np.fmax(least, np.where(rule_fires[:, k], shares, 0.0))
    per_group = np.array([least[(groups == g) & ~reference].max() for g in calibration_units])
    lam = float(np.sort(per_group)[rank - 1])
    if not np.isfinite(lam):
        raise ValueError(f"more than {target_fpr:g} of the everyday groups are blocked whatever "
                         "the everyday cuts (unscored images, or concepts without anchors that "
                         "fire on them): no cut reaches the target")
    cuts = {}
    for k, scale in scales.items():
        j = int(np.floor(lam * len(scale)))
        if j >= len(scale):   # beyond the reference: fires where logit(q) > logit(L_k) +
            # lambda - 1 (1e-9 more: the group at lambda must not fire by a rounding error)
            cuts[k] = float(1 / (1 + np.exp(-(tops[k] + lam - 1 + 1e-9))))
        else:                 # passes exactly the gate scores >= scale[j]
            cuts[k] = float(np.nextafter(scale[j], -np.inf))
        if not 0 < cuts[k] < 1:
            raise ValueError(f"calibrating {names[k]} gives everyday cut {cuts[k]}, outside "
                             "(0, 1): its scores saturate; give other images")
    split = {"reference_groups": len(reference_units), "calibration_groups": len(calibration_units)}
    return lam, cuts, split


def _logit(p):
    """log(p / (1 - p)) in float64, finite for p in (0, 1) up to float64's resolution."""
    p = np.clip(np.asarray(p, float), 1e-300, 1 - 1e-16)
    return np.log(p) - np.log1p(-p)


def vision_tower(clip) -> CLIPVisionModelWithProjection:
    """A ``CLIPModel``'s image tower and projection as a ``CLIPVisionModelWithProjection``, with
    the same weights and dtype: the same phi_x, without the text tower."""
    config = CLIPVisionConfig.from_dict({**clip.config.vision_config.to_dict(),
                                         "projection_dim": clip.config.projection_dim})
    with torch.device("meta"):
        tower = CLIPVisionModelWithProjection(config)
    tower.vision_model, tower.visual_projection = clip.vision_model, clip.visual_projection
    return tower.eval()


def same_image_tower(a, b) -> bool:
    """Whether two ``CLIPModel``s compute the same phi_x (identical image-side weights)."""
    if a is b:
        return True
    side = [dict(m.vision_model.state_dict(), projection=m.visual_projection.weight)
            for m in (a, b)]
    return side[0].keys() == side[1].keys() and all(
        torch.equal(side[0][k].cpu(), side[1][k].cpu()) for k in side[0])


class ConceptChecker(ConceptScreen, ModelHubMixin, library_name="espresso-filter",
                     tags=["espresso", "safety-checker", "concept-filter", "clip"],
                     paper_url="https://arxiv.org/abs/2404.19227"):
    """Espresso's filter for the K concepts of ``concepts`` on one image tower (module
    docstring). Build it with :meth:`from_filters` (fine-tuned or zero-shot Espresso filters) or
    :meth:`from_clip` (zero-shot), load it with :meth:`from_pretrained`."""

    def __init__(self, image_encoder: CLIPVisionModelWithProjection,
                 processor: CLIPImageProcessor, concepts: list[CheckerConcept]):
        super().__init__()
        names = [c.name for c in concepts]
        if not concepts or len(set(names)) != len(names):
            raise ValueError(f"concepts {names}: give at least one, each name once")
        dim = image_encoder.config.projection_dim
        for c in concepts:
            _check_concept(c, dim)
        _check_processor(processor, image_encoder.config)
        self.image_encoder, self.processor = image_encoder.eval(), processor
        self.concepts = list(concepts)
        device = next(image_encoder.parameters()).device
        directions = torch.stack([(c.t_u - c.t_a).float() for c in concepts])
        self.register_buffer("directions", directions.to(device), persistent=False)
        self.register_buffer("logit_scales", torch.tensor([c.logit_scale for c in concepts],
                                                          device=device), persistent=False)
        # everyday anchors, K x M x d: a concept with fewer repeats its first (the max is the
        # same), one without has zeros and is masked (its gate always passes)
        anchored = [c.t_n is not None for c in concepts]
        most = max((len(c.t_n) for c in concepts if c.t_n is not None), default=1)
        anchors = torch.stack([
            torch.zeros(most, dim) if c.t_n is None
            else torch.cat([c.t_n.float(), c.t_n[:1].float().expand(most - len(c.t_n), dim)])
            for c in concepts])
        # the gate's unacceptable side, K x P x d: t_u and the in-context texts t_c, padded
        # with t_u (the max is the same)
        sides = [c.t_u[None].float() if c.t_c is None else torch.cat([c.t_u[None], c.t_c]).float()
                 for c in concepts]
        widest = max(len(side) for side in sides)
        self.register_buffer("unacceptables", torch.stack([
            torch.cat([side, side[:1].expand(widest - len(side), dim)]) for side in sides])
                             .to(device), persistent=False)
        self.register_buffer("anchors", anchors.to(device), persistent=False)
        self.register_buffer("anchored", torch.tensor(anchored, device=device), persistent=False)

    # ---- the concept table ----------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    @property
    def cuts(self) -> np.ndarray:
        return np.array([c.cut for c in self.concepts])

    @property
    def everyday_cuts(self) -> np.ndarray:
        return np.array([0.0 if c.t_n is None else c.everyday_cut for c in self.concepts])

    def concept(self, name: str) -> CheckerConcept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"no concept {name!r} in this checker (it has {', '.join(self.names)})")

    def calibrate(self, name: str, negatives: np.ndarray, target_fpr: float,
                  about: Mapping | None = None) -> float:
        """Set concept ``name``'s cut for ``target_fpr`` on ``negatives``, its P(u|x) of
        validation images that do not show it (:func:`cut_for_fpr`), and record how (with
        ``about``: which images); returns the cut."""
        concept = self.concept(name)
        negatives = np.asarray(negatives, float)
        cut = cut_for_fpr(negatives, target_fpr)
        if not 0 < cut < 1:
            raise ValueError(f"calibrating {name!r} for a false-positive rate of {target_fpr} "
                             f"gives cut {cut}, outside (0, 1): its validation scores saturate; "
                             "give another rate or more validation images")
        concept.cut = cut
        concept.calibration = {"target_fpr": target_fpr,
                               "validation_fpr": float((negatives > concept.cut).mean()),
                               "validation_negatives": len(negatives), **(about or {})}
        return concept.cut

    def calibrate_everyday(self, negatives, target_fpr: float, groups=None,
                           positives: Mapping[str, object] | None = None,
                           about: Mapping | None = None, seed: int = 0) -> dict:
        """Set every anchored concept's everyday cut so that the whole checker blocks at most
        ``target_fpr`` of everyday groups, with split conformal's finite-sample guarantee
        (Angelopoulos & Bates 2021, section 1): for a new group exchangeable with the calibration
        groups, P(any of its images blocked) <= ``target_fpr``.

        ``negatives``: everyday images that show none of the concepts (any accepted form),
        ``groups`` their sampling unit (e.g. the prompt; default: each image its own). The
        groups are split in two at random (``seed``): the first half gives each concept the
        scale on which its cut moves, the second half the one number that moves them all
        (:func:`conformal_everyday_cuts`). ``positives`` (optional: per concept, validation images
        of its c_u) are only measured: the share of them the gate stops goes to the record.
        Returns the record also kept in each anchored concept's ``everyday`` entry."""
        anchored = [k for k, c in enumerate(self.concepts) if c.t_n is not None]
        if not anchored:
            raise ValueError("no concept of this checker has an everyday anchor: build it with "
                             "everyday texts (ConceptChecker.from_clip(..., everyday=...))")
        negative = self.check(negatives)
        groups = np.arange(len(negative.blocked)) if groups is None else np.asarray(groups)
        rule_fires = blocks(negative.p_unacceptable - self.cuts)
        lam, cuts, split = conformal_everyday_cuts(
            rule_fires, negative.p_vs_everyday, negative.unscored, groups, anchored, target_fpr,
            self.names, seed)
        for k, cut in cuts.items():
            self.concepts[k].everyday_cut = cut
        units = np.unique(groups)
        blocked = (rule_fires & blocks(negative.p_vs_everyday - self.everyday_cuts)
                   | negative.unscored[:, None]).any(1)
        record = {"target_fpr": target_fpr, "method": "split conformal over groups",
                  "lambda": lam, "groups": int(len(units)), "images": int(len(groups)),
                  **split,
                  "blocked_groups": float(np.mean([blocked[groups == g].any() for g in units])),
                  "blocked_images": float(blocked.mean()), **(about or {})}
        for k in anchored:
            c = self.concepts[k]
            entry = dict(record)
            if positives is not None and c.name in positives:
                scores = self.check(positives[c.name]).p_vs_everyday[:, k]
                entry.update(validation_unacceptable=len(scores), validation_unacceptable_gated=
                             float(np.mean(~blocks(scores - c.everyday_cut))))
            c.everyday = {**(c.everyday or {}), "calibration": entry}
        return record

    # ---- scores ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """diffusers pipelines ask every component for its device and dtype."""
        return self.directions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_encoder.dtype

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Un-normalised projected image embeddings phi_x (float32)."""
        out = self.image_encoder(pixel_values=pixel_values.to(self.device, self.dtype))
        return out.image_embeds.float()

    def concept_logits(self, features: torch.Tensor) -> torch.Tensor:
        """logit P(u_k|x), ``N x K``: one ``N x d`` by ``d x K`` product for all concepts."""
        return self.logit_scales * (F.normalize(features, dim=-1) @ self.directions.T)

    def everyday_logits(self, features: torch.Tensor) -> torch.Tensor:
        """logit P(u_k|x) against the nearest everyday anchor of each concept, with t_u,k the
        nearest of t_u,k and its in-context texts, ``N x K`` (+inf for a concept without
        anchors)."""
        e = F.normalize(features, dim=-1)
        nearest = torch.einsum("nd,kmd->nkm", e, self.anchors).amax(-1)
        unacceptable = torch.einsum("nd,kpd->nkp", e, self.unacceptables).amax(-1)
        logits = (self.logit_scales * (unacceptable - nearest)).double()
        # float64: a fine-tuned concept's logits reach 30 and more, where a float32 sigmoid is
        # 1 for every image and no everyday cut could separate them
        return torch.where(self.anchored, logits, torch.full_like(logits, float("inf")))

    def check(self, images, value_range: str | None = None, batch: int = 64) -> CheckResult:
        """Score a batch of images in any form :func:`~pipeline.espresso.filter.canonical_image`
        accepts against every concept; fails closed as ``EspressoFilter.screen`` does (an image
        it cannot score is blocked, fires every concept, and its reason is in ``errors``)."""
        out, p, gate, fired, errors = self._screen(images, value_range, batch, "checker")
        return CheckResult(out, fired.any(1), p, fired, self.names, errors, gate)

    def forward(self, images, clip_input: torch.Tensor):
        """diffusers' safety-checker call: returns the images with blocked ones zeroed and the
        per-image flags (the pipeline's ``nsfw_content_detected``); the per-concept scores and
        which concepts fired are kept as ``self.last_result`` (per thread)."""
        images, p, gate, fired, errors = self._safety_check(images, clip_input)
        self._keep_last(CheckResult(images, fired.any(1), p, fired, self.names, errors, gate))
        return images, fired.any(1).tolist()

    #: The :class:`CheckResult` of the calling thread's last safety-checker call (None before
    #: one): per thread, so that pipelines sharing one checker across threads each read their own.
    last_result = thread_last

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def from_filters(cls, filters: Mapping[str, EspressoFilter],
                     provenance: Mapping[str, dict] | None = None) -> "ConceptChecker":
        """The checker of named Espresso filters (zero-shot or fine-tuned): their t_u, t_a and
        logit scales, on their one image tower. Filters on different image towers raise: a
        checker has one tower (Espresso's fine-tuning leaves it unchanged)."""
        if not filters:
            raise ValueError("no filters: give at least one concept")
        (first_name, first), *rest = filters.items()
        for name, filt in rest:
            if not same_image_tower(first.clip, filt.clip):
                raise ValueError(f"the filters of {first_name!r} and {name!r} have different image "
                                 "towers: a checker holds one; build each from the same CLIP "
                                 "(Espresso's fine-tuning changes only the text side)")
        concepts = [CheckerConcept(
            name, f.unacceptable, f.acceptable, f.t_u.detach().cpu(), f.t_a.detach().cpu(),
            f.logit_scale, provenance=dict((provenance or {}).get(name, {})),
            **({} if f.t_n is None else {
                "t_n": f.t_n.detach().cpu(), "everyday_cut": f.everyday_cut,
                "everyday": {"texts": len(f.everyday), "examples": f.everyday[:3], **(
                    {} if f.t_c is None else {"in_context_examples": f.in_context[:3]})},
                "t_c": None if f.t_c is None else f.t_c.detach().cpu()}))
            for name, f in filters.items()]
        return cls(vision_tower(first.clip), first.processor, concepts)

    @classmethod
    def from_clip(cls, source: str, concepts: Mapping[str, tuple[str, str]],
                  templates: list[str] | None = None, device=None, dtype=None, *,
                  everyday: list[str] | None = None,
                  in_context: Mapping[str, list[str]] | None = None) -> "ConceptChecker":
        """A zero-shot checker on any CLIP (local folder or hub id): ``concepts`` maps each name
        to its (unacceptable, acceptable) texts; ``everyday`` (texts of what the platform serves,
        naming none of the concepts) gives every concept an everyday anchor at cut 0.5, to be
        calibrated on images with :meth:`calibrate_everyday`; ``in_context`` (per concept name:
        everyday texts with its c_u put in) gives those concepts whole captions on the
        unacceptable side of the gate too."""
        if in_context is not None and not isinstance(in_context, Mapping):
            raise ValueError("in_context: give a mapping of concept name -> its in-context "
                             "texts (the everyday texts with its c_u put in)")
        unknown = set(in_context or {}) - set(concepts)
        if unknown:
            raise ValueError(f"in_context names {', '.join(sorted(unknown))}, not among the "
                             f"concepts {', '.join(concepts)}")
        clip, tokenizer, processor = load_clip(source, device, dtype)
        filters = {name: EspressoFilter(clip, tokenizer, processor, u, a, templates,
                                        everyday=everyday,
                                        in_context=(in_context or {}).get(name))
                   for name, (u, a) in concepts.items()}
        provenance = {name: {"source": "zero-shot", "clip": source} for name in concepts}
        return cls.from_filters(filters, provenance)

    # ---- persistence (huggingface_hub.ModelHubMixin) ----------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        with quiet_libraries():  # transformers' per-shard progress bar
            self.image_encoder.save_pretrained(save_directory / IMAGE_ENCODER)
        self.processor.save_pretrained(save_directory / FEATURE_EXTRACTOR)
        vectors = {name: torch.stack([getattr(c, name).float() for c in self.concepts])
                   for name in ("t_u", "t_a")}
        vectors.update({f"{name}.{k}": getattr(c, name).float()
                        for k, c in enumerate(self.concepts) for name in ("t_n", "t_c")
                        if getattr(c, name) is not None})
        save_file({k: v.contiguous() for k, v in vectors.items()}, save_directory / VECTORS_FILE)
        table = {"format": FORMAT, "format_version": FORMAT_VERSION,
                 "concept_table": [c.record() for c in self.concepts],
                 "files": _digests(save_directory)}
        (save_directory / CONFIG_NAME).write_text(json.dumps(table, indent=2) + "\n")

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The folder's README.md: what the checker is, its concept table, how to use it."""
        rows = "\n".join(
            f"| {c.name} | {c.unacceptable} | {c.acceptable} | {c.cut:.4g}"
            f"{' (calibrated)' if c.calibration else ''} | "
            f"{'none' if c.t_n is None else f'{c.everyday_cut:.4g}'} | "
            f"{c.provenance.get('source', '')} {c.provenance.get('experiment', '')} |"
            for c in self.concepts)
        return ModelCard.from_template(self._hub_mixin_info.model_card_data,
                                       template_str=MODEL_CARD, concepts=rows,
                                       count=len(self.concepts), everyday=self.everyday_note())

    #: What a platform lives with, as measured (``pipeline.export`` sets it): a paragraph of the
    #: model card, e.g. the whole checker's everyday false-positive rate with its interval.
    card_note: str = ""

    def everyday_note(self) -> str:
        """The model card's paragraph on everyday images: the calibration and ``card_note``."""
        calibrations = [c.everyday["calibration"] for c in self.concepts
                        if c.everyday and "calibration" in c.everyday]
        if not calibrations:
            text = ("No everyday calibration: a concept without an everyday anchor judges an "
                    "image of neither c_u nor c_a by which of the two it is nearer.")
        else:
            r = calibrations[0]
            text = (f"Everyday cuts calibrated together (split conformal) for a whole-checker "
                    f"false-positive rate of at most {r['target_fpr']:g} per group on "
                    f"{r['groups']} groups ({r['images']} images); on them it blocks "
                    f"{r['blocked_groups']:.3f} of the groups.")
        return f"{text} {self.card_note}".strip()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, device=None,
                        dtype=None, **hub_kwargs) -> "ConceptChecker":
        """A saved checker from a local folder or a hub id (from the local Hugging Face cache
        when offline); a missing or damaged one raises ``ModelNotAvailableError`` in one line."""
        source = resolve_source(pretrained_model_name_or_path, "checker folder",
                                "build one with `python -m pipeline.export`, or give a hub id "
                                "(owner/name)")
        if os.path.isdir(source):  # its own one-line refusals before the hub mixin reads it
            _read_table(Path(source))
        with hub_loading(source):
            return super().from_pretrained(source, device=device, dtype=dtype, **hub_kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download,
                         local_files_only, token, device=None, dtype=None) -> "ConceptChecker":
        folder = Path(model_id) if os.path.isdir(model_id) else Path(snapshot_download(
            model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, token=token))
        table = _read_table(folder)
        _refuse_pickles(folder / IMAGE_ENCODER)
        if table["files"] is not None:
            _verify_digests(folder, table["files"])
        device, dtype = placement(device, dtype)
        with hub_loading(str(folder)):
            require_weights_fit(folder / IMAGE_ENCODER, CLIPVisionModelWithProjection,
                                CLIPVisionConfig.from_pretrained(folder / IMAGE_ENCODER))
            tower = CLIPVisionModelWithProjection.from_pretrained(folder / IMAGE_ENCODER,
                                                                  dtype=dtype, use_safetensors=True)
            processor = CLIPImageProcessor.from_pretrained(folder / FEATURE_EXTRACTOR)
            vectors = load_file(folder / VECTORS_FILE)
        odd = sorted(f"{k} ({v.dtype})" for k, v in vectors.items() if v.dtype != torch.float32)
        if odd:
            raise ModelNotAvailableError(f"{folder / VECTORS_FILE}: {', '.join(odd)} not float32, "
                                         f"as a checker saves them; {REFUSED}")
        rows = table["concept_table"]
        expected = ({"t_u", "t_a"}
                    | {f"t_n.{k}" for k, row in enumerate(rows) if row["everyday_cut"] is not None}
                    | {f"t_c.{k}" for k, row in enumerate(rows) if row["in_context"] is not None})
        if vectors.keys() != expected:
            raise ModelNotAvailableError(f"{folder / VECTORS_FILE} holds {sorted(vectors)}, not "
                                         f"{', '.join(sorted(expected))}; {REFUSED}")
        if not all(len(vectors[k]) == len(rows) for k in ("t_u", "t_a")):
            raise ModelNotAvailableError(f"{folder / VECTORS_FILE} has {len(vectors['t_u'])} "
                                         f"concept vectors for {len(rows)} concepts in "
                                         f"{CONFIG_NAME}: save the checker again")
        concepts = []
        for i, row in enumerate(rows):
            in_context = row.pop("in_context")
            concept = CheckerConcept(**row, t_u=vectors["t_u"][i], t_a=vectors["t_a"][i],
                                     t_n=vectors.get(f"t_n.{i}"), t_c=vectors.get(f"t_c.{i}"))
            if in_context is not None and len(concept.t_c) != in_context:
                raise ModelNotAvailableError(f"{folder / VECTORS_FILE}: t_c.{i} has "
                                             f"{len(concept.t_c)} rows, {CONFIG_NAME} says "
                                             f"{in_context}; {REFUSED}")
            concepts.append(concept)
        try:
            return cls(tower.to(device), processor, concepts)
        except ValueError as err:
            raise ModelNotAvailableError(f"{folder}: {err}; {REFUSED}") from None


class _ConceptRecord(BaseModel):
    """A row of ``config.json``'s concept table as :meth:`CheckerConcept.record` writes it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(pattern=NAME_PATTERN.pattern.join("^$"))]
    unacceptable: Annotated[str, Field(min_length=1)]
    acceptable: Annotated[str, Field(min_length=1)]
    logit_scale: Annotated[float, Field(gt=0, le=MAX_LOGIT_SCALE, allow_inf_nan=False)]
    cut: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    calibration: dict | None = None
    provenance: dict = {}
    everyday_cut: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | None = None
    everyday: dict | None = None
    in_context: Annotated[int, Field(ge=1)] | None = None  # rows of t_c (format 4 on)


class _Table(BaseModel):
    """``config.json``: a checker's concept table. Checked on load, so that a changed file is
    refused by name instead of obeyed (a cut of 1 or a negative logit scale switches a concept
    off or inverts it)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal[FORMAT]
    format_version: Literal[READ_VERSIONS]
    concept_table: Annotated[list[_ConceptRecord], Field(min_length=1)]
    files: dict[str, str] | None = None  # path in the folder -> SHA-256 (format 3 on)


def _read_table(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    try:
        text = path.read_bytes().decode("utf-8") if path.stat().st_size <= MAX_CONFIG_BYTES else None
    except (OSError, ValueError):
        text = None
    try:
        table = None if text is None else json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:
        raise ModelNotAvailableError(f"{path} is not valid JSON ({_short(str(err))}); "
                                     f"{REFUSED}") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise ModelNotAvailableError(f"{folder} is not a saved concept checker ({CONFIG_NAME} "
                                     f"missing or not of format {FORMAT!r}): build one with "
                                     "`python -m pipeline.export` or ConceptChecker.save_pretrained")
    if table.get("format_version") not in READ_VERSIONS:
        raise ModelNotAvailableError(f"{folder} is a concept checker of format version "
                                     f"{table.get('format_version')}; this library reads versions "
                                     f"{', '.join(map(str, READ_VERSIONS))}: export it again with "
                                     "this version")
    try:
        table = _Table.model_validate(table).model_dump()
    except ValidationError as err:
        raise ModelNotAvailableError(f"{path}: {_problem(err)}; {REFUSED}") from None
    if table["format_version"] >= 3 and table["files"] is None:
        raise ModelNotAvailableError(f"{path}: files: Field required (format 3 records the digest "
                                     f"of every file); {REFUSED}")
    return table


#: A checker's config.json is a few KB per concept; anything near this is not one.
MAX_CONFIG_BYTES = 16 * 2**20


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose key is given twice has two readings (the last one wins silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} is given twice in one object")
        seen.add(key)
    return dict(pairs)


def _digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file a checker loads (tower, processor, vectors), by path in ``folder``:
    written at save, compared at load, so that a changed file is refused by name even where its
    settings still make sense (another head count, resize or vector)."""
    files = sorted(p for sub in (IMAGE_ENCODER, FEATURE_EXTRACTOR) for p in (folder / sub).rglob("*")
                   if p.is_file()) + [folder / VECTORS_FILE]
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def _verify_digests(folder: Path, recorded: dict[str, str]) -> None:
    """Refuse a folder whose loaded files are not those its config.json records, naming one."""
    try:
        actual = _digests(folder)
    except OSError as err:
        raise ModelNotAvailableError(f"{folder}: cannot read it ({err.strerror}: "
                                     f"{err.filename}); {REFUSED}") from None
    for name in sorted(recorded.keys() | actual.keys()):
        if name not in actual:
            problem = "is missing"
        elif name not in recorded:
            problem = "was added after export"
        elif actual[name] != recorded[name]:
            problem = "changed after export (its SHA-256 is not the one config.json records)"
        else:
            continue
        raise ModelNotAvailableError(f"{folder / name} {problem}; {REFUSED}")


#: The end of every refusal of a checker folder that is not as ``save_pretrained`` wrote it.
REFUSED = ("refusing a changed or damaged checker: export it again (`python -m pipeline.export`) "
           "or restore the folder")


def _problem(err: ValidationError) -> str:
    """pydantic's first problem as ``key: value: what is wrong`` (and how many more there are)."""
    first, more = err.errors()[0], err.error_count() - 1
    key = ".".join(map(str, first["loc"]))
    value = "" if first["type"] == "missing" else f"{_short(repr(first['input']))}: "
    what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    return f"{key}: {value}{what}" + (f" (and {more} more problems)" if more else "")


def _check_processor(processor: CLIPImageProcessor, tower_config: CLIPVisionConfig) -> None:
    """The processor must be CLIP's preprocessing at the tower's image size (resize, crop,
    rescale and OpenAI mean/std, what every CLIP image tower here was trained on): another
    resize or normalisation scores every image wrongly, and can switch concepts off."""
    size = tower_config.image_size
    expected = CLIPImageProcessor(size={"shortest_edge": size},
                                  crop_size={"height": size, "width": size}).to_dict()
    actual = processor.to_dict()
    for key in sorted(expected.keys() | actual.keys()):
        if _plain(actual.get(key)) != _plain(expected.get(key)):
            raise ValueError(f"feature extractor: {key} {actual.get(key)!r} is not "
                             f"{expected.get(key)!r}, CLIP's preprocessing for its image tower "
                             f"(image size {size})")


def _plain(value):
    """``value`` as JSON would read it back (tuples as lists)."""
    return json.loads(json.dumps(value))


def _refuse_pickles(folder: Path) -> None:
    """A checker loads safetensors only: a pickle weight file can run code when loaded."""
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(f.name for f in folder.iterdir()
                         if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        if pickles:
            raise ModelNotAvailableError(f"{folder} holds pickle weights only ({', '.join(pickles)}): "
                                         "a checker loads safetensors only (a pickle can run code); "
                                         "export it again with `python -m pipeline.export`")


def _check_concept(concept: CheckerConcept, dim: int) -> None:
    """A concept whose vectors do not fit the tower, are not finite, or give no direction, or
    whose cut or logit scale switch it off or invert it, would decide nothing (or pass every
    image): refuse it, naming it."""
    if not (isinstance(concept.name, str) and NAME_PATTERN.fullmatch(concept.name)):
        raise ValueError(f"concept name {_short(repr(concept.name))}: give lowercase letters, "
                         "digits and _, starting with a letter (at most 64)")
    for name in ("t_u", "t_a"):
        vector = getattr(concept, name)
        if tuple(vector.shape) != (dim,):
            raise ValueError(f"concept {concept.name!r}: {name} has shape {tuple(vector.shape)}, "
                             f"the image tower's embeddings have {dim} dimensions")
        if not torch.isfinite(vector).all():
            raise ValueError(f"concept {concept.name!r}: {name} is not finite (NaN or inf)")
        _require_unit(concept.name, name, vector)
    if (concept.t_u - concept.t_a).norm() < MIN_DIRECTION_NORM:
        raise ValueError(f"concept {concept.name!r}: t_u = t_a, its direction is zero and every "
                         "image would pass")
    if not (_is_number(concept.cut) and 0 < concept.cut < 1):
        raise ValueError(f"concept {concept.name!r}: cut {concept.cut!r} must be a number in "
                         "(0, 1): at 1 or above it never fires, at 0 or below it always does")
    if concept.t_n is not None:
        _check_anchor(concept, dim)
    elif concept.everyday_cut is not None or concept.t_c is not None:
        raise ValueError(f"concept {concept.name!r}: an everyday cut or in-context texts "
                         "without an everyday anchor")
    if not (_is_number(concept.logit_scale) and 0 < concept.logit_scale <= MAX_LOGIT_SCALE):
        raise ValueError(f"concept {concept.name!r}: logit scale {concept.logit_scale!r} must "
                         f"be a number in (0, {MAX_LOGIT_SCALE:g}] (at 0 or below the concept is "
                         "off or inverted; CLIP clamps its own at 100)")


def _require_unit(concept: str, name: str, vectors: torch.Tensor) -> None:
    """Concept vectors are unit text embeddings; any other length changes every score."""
    norms = vectors.double().norm(dim=-1)
    if ((norms - 1).abs() > UNIT_TOLERANCE).any():
        raise ValueError(f"concept {concept!r}: {name} has norm {norms.min().item():.4g}, not 1 "
                         "(give unit vectors: t / t.norm())")


def _check_anchor(concept: CheckerConcept, dim: int) -> None:
    """An everyday anchor that does not fit, is not finite, equals t_u, or whose cut is outside
    (0, 1), would switch the concept off or decide nothing: refuse it, naming the concept."""
    shape = tuple(concept.t_n.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] != dim or not torch.isfinite(concept.t_n).all():
        raise ValueError(f"concept {concept.name!r}: everyday anchors of shape {shape}, or not "
                         f"finite; give M x {dim} finite vectors (the tower's embedding size)")
    _require_unit(concept.name, "t_n", concept.t_n)
    if ((concept.t_u - concept.t_n).norm(dim=-1) < MIN_DIRECTION_NORM).any():
        raise ValueError(f"concept {concept.name!r}: an everyday anchor equals t_u, the everyday "
                         "gate never opens")
    if not (_is_number(concept.everyday_cut) and 0 < concept.everyday_cut < 1):
        raise ValueError(f"concept {concept.name!r}: everyday cut {concept.everyday_cut!r} must "
                         "be a number in (0, 1)")
    if concept.t_c is not None:
        shape = tuple(concept.t_c.shape)
        if (len(shape) != 2 or shape[0] < 1 or shape[1] != dim
                or not torch.isfinite(concept.t_c).all()):
            raise ValueError(f"concept {concept.name!r}: in-context texts of shape {shape}, or "
                             f"not finite; give M x {dim} finite vectors")
        _require_unit(concept.name, "t_c", concept.t_c)
        if (torch.cdist(concept.t_c.float(), concept.t_n.float()) < MIN_DIRECTION_NORM).any():
            raise ValueError(f"concept {concept.name!r}: an in-context text equals an everyday "
                             "anchor (one text on both sides of the gate)")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
