"""Certified radius of Espresso's linear decision, on analytic toy embeddings."""
import math

import torch

from pipeline.espresso.certificate import (exact_radius, release_bound, search_flip,
                                   worst_case_perturbation)


def toy():
    w = torch.tensor([2.0, 0.0, 0.0])
    z = torch.tensor([[3.0, 1.0, 0.0], [-0.5, 4.0, 0.0], [1.0, 0.0, 2.0]])
    return z, w, torch.tensor([3.0, 0.5, 1.0])  # the known distances to the plane x = 0


def test_exact_radius_is_the_distance_to_the_hyperplane():
    z, w, known = toy()
    assert torch.allclose(exact_radius(z, w), known)


def test_perturbation_just_past_the_radius_flips_and_just_inside_does_not():
    z, w, radius = toy()
    side = torch.sign(z @ w)
    outside = z + worst_case_perturbation(z, w, radius * 1.01)
    inside = z + worst_case_perturbation(z, w, radius * 0.99)
    assert (torch.sign(outside @ w) != side).all()
    assert (torch.sign(inside @ w) == side).all()


def test_optimiser_finds_no_flip_inside_the_radius_and_one_outside():
    torch.manual_seed(0)
    z, w = torch.randn(64, 16) * 3, torch.randn(16)
    radius = exact_radius(z, w)
    side = torch.sign(z @ w)
    inside = z + search_flip(z, w, radius * 0.99)
    outside = z + search_flip(z, w, radius * 1.01)
    assert (torch.sign(inside @ w) == side).all()
    assert (torch.sign(outside @ w) != side).all()


def test_release_bound_is_looser_than_the_exact_radius():
    # By hand, from release_bound = |z| * (1 - s / (s + 2 |P(u|x) - 1/2|)), P = sigmoid(s <z/|z|, w>):
    # s = 10, w = (a, 0) with a = ln(3) / 6, so that s <e, w> = 10 * 0.6 * a = ln 3 for e = (0.6, 0.8).
    #   z = (3, 4):   |z| = 5,  e = (0.6, 0.8),   P = sigmoid(ln 3) = 3/4, 2|P - 1/2| = 1/2,
    #                 bound = 5 * (1 - 10 / 10.5) = 5 / 21;   exact |<z,w>| / |w| = 3a / a = 3
    #   z = (-6, -8): |z| = 10, e = (-0.6, -0.8), P = sigmoid(-ln 3) = 1/4, 2|P - 1/2| = 1/2,
    #                 bound = 10 / 21;                          exact = 6a / a = 6
    #   z = (0, 2):   on the plane, P = 1/2: bound 0 = exact 0
    # and every bound is at most |z| / (s + 1): 5/11, 10/11, 0.
    a = math.log(3) / 6
    z, w, scale = torch.tensor([[3.0, 4.0], [-6.0, -8.0], [0.0, 2.0]]), torch.tensor([a, 0.0]), 10.0
    bound = release_bound(z, w, scale)
    assert torch.allclose(bound, torch.tensor([5 / 21, 10 / 21, 0.0]), rtol=0, atol=1e-6)
    assert torch.allclose(exact_radius(z, w), torch.tensor([3.0, 6.0, 0.0]), rtol=0, atol=1e-6)
    assert (bound[:2] > 0).all() and (bound[:2] < exact_radius(z, w)[:2]).all()
    assert (bound <= z.norm(dim=-1) / (scale + 1) + 1e-6).all()

    torch.manual_seed(1)
    t_u, t_a = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    z, w = torch.randn(256, 16) * 3, t_u - t_a  # as in Espresso: unit concept embeddings
    scale = 100.0
    bound = release_bound(z, w, scale)
    assert (bound > 0).all()  # no embedding lies exactly on the plane
    assert (bound <= z.norm(dim=-1) / (scale + 1) + 1e-6).all()
    assert (bound <= exact_radius(z, w) + 1e-6).all()
