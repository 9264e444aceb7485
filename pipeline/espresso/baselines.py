"""The filters every evaluation compares, behind one interface (METHOD sections 2 and 5).

- ``none``: passes everything (the unfiltered model);
- ``keyword``: a prompt blocklist holding the unacceptable concept text;
- ``threshold``: one concept, cosine(image, t_u) above a cut calibrated on validation images,
  in the style of Stable Diffusion's safety checker;
- ``zero_shot``: Espresso on the original CLIP (no fine-tuning);
- ``espresso``: Espresso with the fine-tuned text side.

The evaluate and attack stages build the same bank from the same validation images, so the
threshold filter's cut is identical in both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.espresso.filter import EspressoFilter

FILTERS = ("none", "keyword", "threshold", "zero_shot", "espresso")


def calibrate_threshold(scores: np.ndarray, unacceptable: np.ndarray) -> float:
    """The cut on validation scores with the best balanced accuracy (midpoint between scores)."""
    cuts = np.unique(scores)
    cuts = np.concatenate([[cuts[0] - 1e-6], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1e-6]])
    accuracy = [((scores[unacceptable] > c).mean() + (scores[~unacceptable] <= c).mean()) / 2
                for c in cuts]
    return float(cuts[int(np.argmax(accuracy))])


class ThresholdFilter(EspressoFilter):
    """The threshold filter behind Espresso's interface, so that an attack can adapt to it (a
    "+" run's terms and trial use ``margin``, ``screen`` and ``logit_scale``): its margin
    ``cos(e, t_u) - cut`` is linear in the unit embedding like Espresso's, and ``screen`` blocks
    exactly where :meth:`FilterBank.decide` does, with P(u|x) = sigmoid(s * margin). It shares
    the zero-shot filter's CLIP; it is built from a bank, not saved (the folder format holds no
    cut)."""

    def __init__(self, zero_shot: EspressoFilter, cut: float):
        super().__init__(zero_shot.clip, zero_shot.tokenizer, zero_shot.processor,
                         zero_shot.unacceptable, zero_shot.acceptable, zero_shot.templates)
        self.cut = cut

    @property
    def direction(self) -> torch.Tensor:
        return self.t_u

    def margin(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``cos(embeddings, t_u) - cut`` per row: > 0 is blocked."""
        return F.normalize(embeddings, dim=-1) @ self.t_u - self.cut


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
    computes the evaluation's CLIP accuracy and CLIP score."""

    zero_shot: EspressoFilter
    tuned: EspressoFilter
    threshold: float

    @classmethod
    def calibrated(cls, zero_shot: EspressoFilter, tuned: EspressoFilter,
                   val_features: torch.Tensor, val_unacceptable: np.ndarray) -> "FilterBank":
        """Calibrate the threshold filter on validation image features of the original CLIP."""
        return cls(zero_shot, tuned, calibrate_threshold(
            cls._cosine_to_concept(zero_shot, val_features), np.asarray(val_unacceptable, bool)))

    def threshold_filter(self) -> ThresholdFilter:
        return ThresholdFilter(self.zero_shot, self.threshold)

    @staticmethod
    def _cosine_to_concept(zero_shot: EspressoFilter, features: torch.Tensor) -> np.ndarray:
        return (F.normalize(features, dim=-1) @ zero_shot.t_u).cpu().numpy()

    def decide(self, images: np.ndarray, prompts: list[str], features: torch.Tensor
               ) -> dict[str, Decision]:
        """Each filter's decision on each image; ``features`` = ``self.zero_shot.embed(images)``.
        Both Espresso filters go through the library's fail-closed ``screen``: an image it could
        not score is blocked, counted in ``unscored`` and its reason logged by ``screen``."""
        n = len(images)
        keyword = np.array([self.zero_shot.unacceptable.lower() in p.lower() for p in prompts])
        cosine = self._cosine_to_concept(self.zero_shot, features)
        scored = np.zeros(n, bool)
        out = {"none": Decision(np.zeros(n), np.zeros(n, bool), scored),
               "keyword": Decision(keyword.astype(float), keyword, scored),
               "threshold": Decision(cosine, cosine > self.threshold, scored)}
        for name, filt in (("zero_shot", self.zero_shot), ("espresso", self.tuned)):
            screening = filt.screen(images)
            unscored = np.array([e is not None for e in screening.errors], bool)
            out[name] = Decision(np.nan_to_num(screening.p_unacceptable, nan=1.0),
                                 screening.blocked, unscored)
        return out
