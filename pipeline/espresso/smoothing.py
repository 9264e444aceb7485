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


def tower_features(screen: ConceptScreen, pixels: torch.Tensor) -> torch.Tensor:
    """phi_x of tower pixels in [0, 1] (the processor's normalisation, then the tower);
    differentiable."""
    mean = torch.tensor(screen.processor.image_mean)[:, None, None]
    std = torch.tensor(screen.processor.image_std)[:, None, None]
    return screen.image_features((pixels - mean) / std)


@torch.no_grad()
def base_blocked(screen: ConceptScreen, pixels: torch.Tensor) -> np.ndarray:
    """h on a batch of tower pixels in [0, 1] (noise may take them out): blocked where any
    concept fires by the screen's cuts and gates, or the scores are not finite."""
    features = tower_features(screen, pixels)
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


def _margin(screen: ConceptScreen, pixels: torch.Tensor) -> torch.Tensor:
    """The screen's decision margin (> 0: blocked) of tower pixels in [0, 1], differentiable."""
    return screen.decision_margin(tower_features(screen, pixels))


def _project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
    return delta * torch.clamp(radius / norms, max=1.0)


def _pgd(loss_of, x: torch.Tensor, radius: float, steps: int, clip: bool) -> torch.Tensor:
    """L2 PGD from ``x`` that lowers ``loss_of`` (per image) within ``radius``: normalised
    gradient steps of 2.5 radius / steps, projected on the ball (and on [0, 1] with ``clip``)."""
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        grad, = torch.autograd.grad(loss_of(x + delta).sum(), delta)
        step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        delta = _project(delta.detach() - 2.5 * radius / steps * step, radius)
        if clip:
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def pgd_flip_radius(screen: ConceptScreen, images, radii: list[float], steps: int = 50,
                    value_range: str | None = None) -> np.ndarray:
    """Per image, the smallest of ``radii`` (L2, tower pixels in [0, 1]) at which a white-box
    PGD on the unsmoothed decision margin flips the screen's decision, the image kept in
    [0, 1]; inf where none of them does. What the plain filter withstands in pixels."""
    x = tower_pixels(screen, images, value_range)
    with torch.no_grad():
        sign = torch.where(_margin(screen, x) > 0, 1.0, -1.0).double()
    found = np.full(len(x), np.inf)
    for radius in sorted(radii):
        left = np.flatnonzero(~np.isfinite(found))
        if not len(left):
            break
        rows = torch.from_numpy(left)
        moved = _pgd(lambda z: sign[rows] * _margin(screen, z), x[rows], radius, steps, True)
        with torch.no_grad():
            flipped = (sign[rows] * _margin(screen, moved) <= 0).numpy()
        found[left[flipped]] = radius
    return found


def predict(screen: ConceptScreen, pixels: torch.Tensor, smoothing: Smoothing,
            generator: torch.Generator) -> np.ndarray:
    """Cohen et al.'s PREDICT on tower pixels: per image 1 (blocked), 0 (passed) or -1
    (abstained: the two counts of ``smoothing.n`` samples do not differ at level alpha)."""
    from scipy.stats import binomtest

    out = []
    for x in pixels:
        blocked = _blocked_votes(screen, x, smoothing.n, smoothing, generator)
        top = max(blocked, smoothing.n - blocked)
        if binomtest(top, smoothing.n, 0.5).pvalue > smoothing.alpha:
            out.append(-1)
        else:
            out.append(int(blocked > smoothing.n - blocked))
    return np.array(out)


def smoothed_attack(screen: ConceptScreen, images, certificate: Certificate, steps: int = 20,
                    noise_samples: int = 16, shrink: float = 0.999, temperature: float = 4.0,
                    value_range: str | None = None) -> np.ndarray:
    """Attack the smoothed decision of every certified image within ``shrink`` times its
    certified radius (PGD on the expectation over ``noise_samples`` noise draws of
    tanh(margin / ``temperature``), as SmoothAdv attacks a smoothed classifier; not clipped to
    [0, 1], as the certificate is not), then PREDICT at the moved image with fresh noise.
    Returns per image: 1 where PREDICT gives the opposite of the certified decision (a
    violation of the certificate, expected never), 0 where not, -1 where nothing was certified."""
    s = certificate.smoothing
    x = tower_pixels(screen, images, value_range)
    generator = torch.Generator().manual_seed(s.seed + 1)
    out = np.full(len(x), -1)
    for i in np.flatnonzero(~certificate.abstained):
        sign = 1.0 if certificate.blocked[i] else -1.0
        noise = torch.randn((noise_samples, *x[i].shape), generator=generator) * s.sigma

        def loss_of(z: torch.Tensor) -> torch.Tensor:
            noisy = z[:, None] + noise[None]            # 1 x samples x 3 x S x S
            margins = _margin(screen, noisy.flatten(0, 1)).view(len(z), noise_samples)
            return sign * torch.tanh(margins / temperature).mean(1)

        moved = _pgd(loss_of, x[i:i + 1], shrink * float(certificate.radius[i]), steps, False)
        decision = predict(screen, moved, s, generator)[0]
        out[i] = int(decision == (0 if certificate.blocked[i] else 1))
    return out
