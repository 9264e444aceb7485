"""A certificate in pixel space: randomized smoothing (Cohen, Rosenfeld, Kolter 2019) of any
Espresso screen, the single filter or the checker (docs/method.md, "Smoothing in pixel space").

The base decision h(x) is the screen's own: blocked where any concept fires (its cuts and
everyday gates), or where the noisy image has no finite score (fail closed). The smoothed
decision g(x) is the decision h takes most often on x + N(0, sigma^2 I), with x the image as
the image tower sees it: CLIP's processor's resize and centre crop, pixels in [0, 1], before
its normalisation. Noise is not clipped to [0, 1] (Cohen et al. do not either: the guarantee
needs the Gaussian unchanged).

:func:`certify` is Cohen et al.'s CERTIFY: ``n0`` selection samples guess the top decision,
``n`` fresh estimation samples count it, and with p_lower the one-sided Clopper-Pearson bound
at level ``alpha``, g is certified constant within L2 radius sigma * Phi^-1(p_lower) around x
(with probability at least 1 - alpha over the samples) where p_lower > 1/2; otherwise it
abstains, and an abstention is blocked (fail closed) with radius 0. The radius is in pixel
units of the tower's input in [0, 1] (for the mini world the image itself, 32 x 32 x 3)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.espresso.filter import ConceptScreen, as_image_list, blocks, canonical_image

#: What a user without scipy is told (it is not a core dependency of the filter library).
NEEDS_SCIPY = ("randomized smoothing needs scipy (Clopper-Pearson bounds): "
               "pip install 'espresso-filter[smoothing]'")


@dataclass(frozen=True)
class Smoothing:
    """The smoothing's noise and the certificate's samples (Cohen et al.'s names)."""

    sigma: float            # noise standard deviation on pixels in [0, 1]
    n0: int = 100           # selection samples: which decision is the top one
    n: int = 10_000         # estimation samples: how sure, p_lower
    alpha: float = 0.001    # the certificate fails with probability at most alpha
    batch: int = 1_000      # noisy copies scored at once
    seed: int = 0           # the noise's generator (a certificate is reproducible)

    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and self.sigma > 0):
            raise ValueError(f"smoothing sigma {self.sigma!r}: give a noise scale > 0 "
                             "(pixels in [0, 1], e.g. 0.25)")
        if not (0 < self.alpha < 0.5):
            raise ValueError(f"smoothing alpha {self.alpha!r}: give a failure probability in "
                             "(0, 0.5), e.g. 0.001")
        for name in ("n0", "n", "batch"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"smoothing {name} {getattr(self, name)!r}: give a whole "
                                 "number >= 1")


@dataclass
class Certificate:
    """Per image: the smoothed decision and how far it provably holds."""

    blocked: np.ndarray      # bool N: the smoothed decision (an abstention is blocked)
    abstained: np.ndarray    # bool N: no decision certified (p_lower <= 1/2)
    radius: np.ndarray       # float N: certified L2 radius in [0, 1] pixels (0: abstained)
    p_lower: np.ndarray      # float N: Clopper-Pearson lower bound of the top decision's share
    top_count: np.ndarray    # int N: estimation samples that took the top decision
    smoothing: Smoothing

    def certified(self, blocked: bool, radius: float = 0.0) -> np.ndarray:
        """bool N: certified to be ``blocked`` (True) or passed (False) at ``radius`` or more."""
        return ~self.abstained & (self.blocked == blocked) & (self.radius >= radius)


def tower_pixels(screen: ConceptScreen, images, value_range: str | None = None) -> torch.Tensor:
    """``N x 3 x S x S`` in [0, 1]: each image as the tower sees it before normalisation (the
    processor's resize and centre crop of its canonical uint8 form)."""
    canonical = [canonical_image(image, value_range) for image in as_image_list(images)]
    return screen.processor(images=canonical, return_tensors="pt", do_normalize=False,
                            input_data_format="channels_last").pixel_values.float()


@torch.no_grad()
def base_blocked(screen: ConceptScreen, pixels: torch.Tensor) -> np.ndarray:
    """h on a batch of tower pixels in [0, 1] (noise may take them out): blocked where any
    concept fires by the screen's cuts and gates, or the scores are not finite."""
    mean = torch.tensor(screen.processor.image_mean)[:, None, None]
    std = torch.tensor(screen.processor.image_std)[:, None, None]
    features = screen.image_features((pixels - mean) / std)
    p = screen.concept_p(features).double().cpu().numpy()
    gate = screen.everyday_p(features).double().cpu().numpy()
    unscored = ~(np.isfinite(p).all(1) & np.isfinite(gate).all(1))
    fired = blocks(p - screen.cuts) & blocks(gate - screen.everyday_cuts)
    return fired.any(1) | unscored


def _blocked_votes(screen: ConceptScreen, x: torch.Tensor, count: int, s: Smoothing,
                   generator: torch.Generator) -> int:
    """How many of ``count`` noisy copies of ``x`` (3 x S x S) h blocks."""
    votes, left = 0, count
    while left:
        size = min(left, s.batch)
        noise = torch.randn((size, *x.shape), generator=generator) * s.sigma
        votes += int(base_blocked(screen, x[None] + noise).sum())
        left -= size
    return votes


def certify(screen: ConceptScreen, images, smoothing: Smoothing,
            value_range: str | None = None, progress: bool = False) -> Certificate:
    """Cohen et al.'s CERTIFY of every image (module docstring). An image whose form cannot be
    read raises ``ValueError`` naming it (there is no image to certify)."""
    from tqdm import tqdm
    try:
        from scipy.stats import binomtest, norm
    except ImportError:
        raise ImportError(NEEDS_SCIPY) from None

    s = smoothing
    pixels = tower_pixels(screen, images, value_range)
    generator = torch.Generator().manual_seed(s.seed)
    rows = []
    for x in tqdm(pixels, desc=f"certify sigma {s.sigma:g}", unit="image", disable=not progress):
        top_blocked = 2 * _blocked_votes(screen, x, s.n0, s, generator) >= s.n0  # a tie blocks
        blocked_votes = _blocked_votes(screen, x, s.n, s, generator)
        count = blocked_votes if top_blocked else s.n - blocked_votes
        p_lower = binomtest(count, s.n).proportion_ci(1 - 2 * s.alpha, "exact").low
        rows.append((top_blocked, p_lower, count))
    top = np.array([r[0] for r in rows], bool)
    p_lower = np.array([r[1] for r in rows], float)
    abstained = p_lower <= 0.5
    radius = np.where(abstained, 0.0, s.sigma * norm.ppf(np.clip(p_lower, 0.5, 1.0)))
    return Certificate(blocked=top | abstained, abstained=abstained, radius=radius,
                       p_lower=p_lower, top_count=np.array([r[2] for r in rows], int),
                       smoothing=s)
