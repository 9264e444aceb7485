"""The filters every evaluation compares, behind one interface (METHOD sections 2, 5 and 8).

- ``none``: passes everything (the unfiltered model);
- ``keyword``: a prompt blocklist holding the unacceptable concept text;
- ``safety_checker``: diffusers' own ``StableDiffusionSafetyChecker`` given the concept: its one
  concept embedding is t_u, its threshold the cut calibrated on validation images (the filtering
  CRT that ships with Stable Diffusion, METHOD section 8);
- ``mhsc``: an MHSC-style linear probe (Qu et al. 2023): logistic regression (scikit-learn) on
  unit CLIP image embeddings of the labelled training images;
- ``zero_shot``: Espresso on the original CLIP (no fine-tuning);
- ``espresso``: Espresso with the fine-tuned text side.

The evaluate and attack stages build the same bank from the same images, so the safety
checker's cut and the probe's weights are identical in both. The safety checker and the probe
also stand behind Espresso's interface (a linear ``margin`` on CLIP embeddings, ``screen``,
``logit_scale``), so that a "+" attack can adapt to them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

from pipeline.espresso.filter import EspressoFilter
from pipeline.espresso.models import quiet_libraries

#: The filters with a margin on CLIP embeddings, which a "+" attack can adapt to: name in
#: ``filter_names.FILTERS`` -> their field of ``FilterBank`` (none and keyword have no margin).
ADAPTABLE = {"safety_checker": "safety_checker", "mhsc": "mhsc", "zero_shot": "zero_shot",
             "espresso": "tuned"}


def calibrate_threshold(scores: np.ndarray, unacceptable: np.ndarray) -> float:
    """The cut on validation scores with the best balanced accuracy (midpoint between scores)."""
    cuts = np.unique(scores)
    cuts = np.concatenate([[cuts[0] - 1e-6], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1e-6]])
    accuracy = [((scores[unacceptable] > c).mean() + (scores[~unacceptable] <= c).mean()) / 2
                for c in cuts]
    return float(cuts[int(np.argmax(accuracy))])


def concept_safety_checker(clip, concept: torch.Tensor, cut: float
                           ) -> StableDiffusionSafetyChecker:
    """diffusers' ``StableDiffusionSafetyChecker`` for one concept: CLIP's own image tower and
    projection (shared, not copied), ``concept`` as its only concept embedding, ``cut`` as that
    concept's threshold, and no "special care" concepts. It drops into a diffusers pipeline as
    ``safety_checker=`` and flags an image when ``round(cos(image, concept) - cut, 3) > 0``."""
    # the checker's class asks for eager attention; its towers are CLIP's, so it allocates none
    config = type(clip.config).from_dict(clip.config.to_dict(), attn_implementation="eager")
    with torch.device("meta"):
        checker = StableDiffusionSafetyChecker(config)
    checker.vision_model = clip.vision_model
    checker.visual_projection = clip.visual_projection
    dim = clip.config.projection_dim
    frozen = dict(requires_grad=False)
    device, dtype = clip.device, clip.dtype
    checker.concept_embeds = torch.nn.Parameter(concept.detach().to(device, dtype)[None], **frozen)
    checker.concept_embeds_weights = torch.nn.Parameter(
        torch.tensor([cut], device=device, dtype=dtype), **frozen)
    checker.special_care_embeds = torch.nn.Parameter(torch.zeros(0, dim, device=device,
                                                                 dtype=dtype), **frozen)
    checker.special_care_embeds_weights = torch.nn.Parameter(torch.zeros(0, device=device,
                                                                         dtype=dtype), **frozen)
    return checker.eval()


class SafetyCheckerFilter(EspressoFilter):
    """The concept's safety checker behind Espresso's interface (what a "+" attack adapts to):
    margin ``cos(e, t_u) - cut``, linear in the unit embedding, > 0 where the checker flags
    (up to its rounding of the score to 3 decimals), P(u|x) = sigmoid(s * margin). It shares the
    zero-shot filter's CLIP; ``checker`` is the diffusers module itself."""

    def __init__(self, zero_shot: EspressoFilter, cut: float):
        super().__init__(zero_shot.clip, zero_shot.tokenizer, zero_shot.processor,
                         zero_shot.unacceptable, zero_shot.acceptable, zero_shot.templates)
        self.cut = cut
        self.checker = concept_safety_checker(zero_shot.clip, zero_shot.t_u, cut)

    @property
    def direction(self) -> torch.Tensor:
        return self.t_u

    def margin(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``cos(embeddings, t_u) - cut`` per row: > 0 is flagged."""
        return F.normalize(embeddings, dim=-1) @ self.t_u - self.cut

    @torch.no_grad()
    def flags(self, pixel_values: torch.Tensor) -> np.ndarray:
        """The diffusers checker's own decision on the processor's pixel values."""
        placeholders = [np.zeros(1) for _ in range(len(pixel_values))]
        with quiet_libraries():  # its "NSFW content was detected" warning per flagged batch
            _, flagged = self.checker(clip_input=pixel_values.to(self.device, self.dtype),
                                      images=placeholders)
        return np.asarray(flagged, bool)


class LinearProbeFilter(EspressoFilter):
    """MHSC-style filter: ``w . e + b`` on the unit image embedding e, fitted by logistic
    regression on labelled training images; P(u|x) = sigmoid(w . e + b) (``logit_scale`` 1).
    Behind Espresso's interface, so "+" attacks adapt to its margin; shares the zero-shot
    filter's CLIP."""

    def __init__(self, zero_shot: EspressoFilter, weight: torch.Tensor, bias: float):
        super().__init__(zero_shot.clip, zero_shot.tokenizer, zero_shot.processor,
                         zero_shot.unacceptable, zero_shot.acceptable, zero_shot.templates)
        self.register_buffer("weight", weight.float().to(zero_shot.device), persistent=False)
        self.bias = float(bias)

    @classmethod
    def fit(cls, zero_shot: EspressoFilter, features: torch.Tensor, unacceptable: np.ndarray,
            regularization: float, max_iter: int) -> "LinearProbeFilter":
        """Logistic regression (L2, ``C = regularization``, lbfgs: deterministic) on the unit
        image embeddings ``features`` labelled ``unacceptable``."""
        from sklearn.linear_model import LogisticRegression

        unit = F.normalize(features.float(), dim=-1).cpu().numpy()
        probe = LogisticRegression(C=regularization, max_iter=max_iter)
        probe.fit(unit, np.asarray(unacceptable, bool))
        return cls(zero_shot, torch.from_numpy(probe.coef_[0]).float(), probe.intercept_[0])

    @property
    def direction(self) -> torch.Tensor:
        return self.weight

    @property
    def logit_scale(self) -> float:
        return 1.0

    def margin(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The probe's logit ``w . e + b`` per row (unit e): > 0 is blocked."""
        return F.normalize(embeddings.float(), dim=-1) @ self.weight + self.bias


@dataclass
class Decision:
    """One filter's verdicts on a batch: its score (higher = more unacceptable; 1 where it could
    not score), whether it blocked, and whether it could not score (and so blocked)."""

    score: np.ndarray
    blocked: np.ndarray
    unscored: np.ndarray


@dataclass
class FilterBank:
    """The compared filters for one concept; ``zero_shot`` wraps the original CLIP, which also
    computes the evaluation's CLIP accuracy and CLIP score, and which the safety checker and the
    probe share."""

    zero_shot: EspressoFilter
    tuned: EspressoFilter
    safety_checker: SafetyCheckerFilter
    mhsc: LinearProbeFilter

    @classmethod
    def build(cls, zero_shot: EspressoFilter, tuned: EspressoFilter,
              train: tuple[torch.Tensor, np.ndarray], val: tuple[torch.Tensor, np.ndarray],
              probe: dict) -> "FilterBank":
        """The safety checker's cut calibrated on validation, the probe fitted on training
        (each a pair of the original CLIP's image features and is-unacceptable labels)."""
        val_features, val_unacceptable = val
        cosine = (F.normalize(val_features, dim=-1) @ zero_shot.t_u).cpu().numpy()
        cut = calibrate_threshold(cosine, np.asarray(val_unacceptable, bool))
        return cls(zero_shot, tuned, SafetyCheckerFilter(zero_shot, cut),
                   LinearProbeFilter.fit(zero_shot, *train, probe["regularization"],
                                         probe["max_iter"]))

    def by_name(self, name: str) -> EspressoFilter:
        """A filter of ``ADAPTABLE`` by its name in ``FILTERS``."""
        return getattr(self, ADAPTABLE[name])

    @torch.no_grad()
    def decide(self, images: np.ndarray, prompts: list[str], batch: int = 64
               ) -> dict[str, Decision]:
        """Each filter's decision on each image. The safety checker's is diffusers' own call
        (score: its unrounded ``cos - cut``); the probe and both Espresso filters go through the
        library's fail-closed ``screen``: an image one could not score is blocked, counted in
        ``unscored`` and its reason logged by ``screen``."""
        n = len(images)
        keyword = np.array([self.zero_shot.unacceptable.lower() in p.lower() for p in prompts])
        checker = self.safety_checker
        flagged, margin = [], []
        for start in range(0, n, batch):
            pixels = checker.pixel_values(images[start:start + batch])
            flagged.append(checker.flags(pixels))
            margin.append(checker.margin(checker.image_features(pixels)).cpu().numpy())
        scored = np.zeros(n, bool)
        out = {"none": Decision(np.zeros(n), np.zeros(n, bool), scored),
               "keyword": Decision(keyword.astype(float), keyword, scored),
               "safety_checker": Decision(np.concatenate(margin), np.concatenate(flagged),
                                          scored)}
        for name in ("mhsc", "zero_shot", "espresso"):
            screening = self.by_name(name).screen(images)
            unscored = np.array([e is not None for e in screening.errors], bool)
            out[name] = Decision(np.nan_to_num(screening.p_unacceptable, nan=1.0),
                                 screening.blocked, unscored)
        return out
