"""Randomized smoothing in pixel space (docs/method.md, "Smoothing in pixel space").

Known answer: for a linear decision the smoothed decision's exact certified radius is the
distance to the decision boundary (Cohen et al. 2019, section 3.1), so Monte Carlo CERTIFY must
give a radius at most that distance and, away from saturation, close to it."""
import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor

from pipeline.espresso.filter import ConceptScreen
from pipeline.espresso.smoothing import (Smoothing, certify, pgd_flip_radius, predict,
                                        smoothed_attack, tower_pixels)

SIZE = 8


class MeanScreen(ConceptScreen):
    """Fires where the mean of channel 0 (pixels in [0, 1]) exceeds ``level``: a hyperplane
    whose normal has 1 / SIZE^2 on the SIZE^2 channel-0 pixels, so the L2 distance of an image
    to it is |mean - level| * SIZE."""

    def __init__(self, level: float, broken: bool = False):
        super().__init__()
        self.processor = CLIPImageProcessor(
            size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
            image_mean=[0.5] * 3, image_std=[0.5] * 3)
        self.level, self.broken = level, broken

    def image_features(self, pixel_values):
        mean = (pixel_values[:, 0] * 0.5 + 0.5).mean((1, 2))[:, None]
        return mean * float("nan") if self.broken else mean

    def concept_logits(self, features):
        return 1e3 * (features - self.level)

    @property
    def cuts(self):
        return np.array([0.5])


def grey(value: int) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), value, np.uint8)


def test_the_certified_radius_of_a_linear_decision_is_its_distance_to_the_boundary():
    screen, smoothing = MeanScreen(0.5), Smoothing(sigma=0.5, n=20_000, seed=1)
    values = [60, 100, 115, 140, 155, 230]
    cert = certify(screen, [grey(v) for v in values], smoothing)
    distance = np.abs(np.array(values) / 255 - 0.5) * SIZE
    assert cert.blocked.tolist() == [v / 255 > 0.5 for v in values]
    assert not cert.abstained.any()
    assert (cert.radius <= distance + 1e-9).all()          # never more than the truth
    saturated = 3.3 * smoothing.sigma                      # p_lower of n = 20,000 at best
    close = distance < 0.8 * saturated
    assert close.sum() >= 3 and (cert.radius[close] >= 0.9 * distance[close] - 0.02).all()
    assert (cert.radius[~close] >= 0.7 * saturated).all()


def test_an_image_on_the_boundary_abstains_and_is_blocked():
    cert = certify(MeanScreen(128 / 255), [grey(128)], Smoothing(sigma=0.25, n=2_000))
    assert cert.abstained.tolist() == [True] and cert.blocked.tolist() == [True]
    assert cert.radius.tolist() == [0.0]
    assert not cert.certified(True).any() and not cert.certified(False).any()


def test_no_finite_score_blocks_with_certainty_and_noise_is_reproducible():
    cert = certify(MeanScreen(0.5, broken=True), [grey(10)], Smoothing(sigma=0.5, n=500))
    assert cert.blocked.tolist() == [True] and cert.top_count.tolist() == [500]
    again = [certify(MeanScreen(0.5), [grey(120)], Smoothing(sigma=0.5, n=500, seed=s)).top_count
             for s in (3, 3, 4)]
    assert again[0] == again[1] and again[0] != again[2]


@pytest.mark.parametrize("bad, match", [({"sigma": 0}, "sigma"), ({"sigma": 0.1, "alpha": 0.5},
                                        "alpha"), ({"sigma": 0.1, "n": 0}, "n 0")])
def test_bad_smoothing_settings_are_refused_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match):
        Smoothing(**bad)


def test_pgd_flips_the_plain_decision_at_its_distance_to_the_boundary():
    values = [100, 115, 150]                               # distances 0.86, 0.39, 0.70
    radii = [0.1 * k for k in range(1, 13)]
    found = pgd_flip_radius(MeanScreen(0.5), [grey(v) for v in values], radii, steps=30)
    distance = np.abs(np.array(values) / 255 - 0.5) * SIZE
    expected = [min(r for r in radii if r >= d * 1.001) for d in distance]
    assert found.tolist() == pytest.approx(expected)
    assert pgd_flip_radius(MeanScreen(0.5), [grey(5)], [0.5]).tolist() == [np.inf]


def test_an_attack_on_the_smoothed_decision_stays_inside_the_certificate_and_flips_beyond():
    """Within its certified radius no attack flips the smoothed decision (counted: 0); the
    same attack given 1.5 times the true distance flips it, so the attack is not toothless."""
    screen, smoothing = MeanScreen(0.5), Smoothing(sigma=0.25, n=2_000, seed=2)
    images = [grey(v) for v in (105, 120, 140, 150)]
    cert = certify(screen, images, smoothing)
    assert not cert.abstained.any()
    assert smoothed_attack(screen, images, cert, steps=10).tolist() == [0, 0, 0, 0]
    distance = np.abs(np.array([105, 120, 140, 150]) / 255 - 0.5) * SIZE
    beyond = type(cert)(**{**cert.__dict__, "radius": 1.5 * distance / 0.999})
    assert smoothed_attack(screen, images, beyond, steps=10).tolist() == [1, 1, 1, 1]
    moved = tower_pixels(screen, images)
    assert (predict(screen, moved, smoothing, torch.Generator().manual_seed(0))
            == cert.blocked.astype(int)).all()
