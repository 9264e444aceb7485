"""Certified radius of Espresso's linear decision, on analytic toy embeddings."""
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
    torch.manual_seed(1)
    t_u, t_a = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    z, w = torch.randn(256, 16) * 3, t_u - t_a  # as in Espresso: unit concept embeddings
    scale = 100.0
    bound = release_bound(z, w, scale)
    assert (bound <= z.norm(dim=-1) / (scale + 1) + 1e-6).all()
    assert (bound <= exact_radius(z, w) + 1e-6).all()
