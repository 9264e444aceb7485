"""Certified robustness of Espresso's decision (METHOD section 7).

The decision is ``block iff g(z) = <z, w> > 0`` with z = phi_x(x) and w = t_u - t_a, a linear
classifier in image-embedding space. Its exact L2 certified radius is the distance to the
hyperplane, ``R = |<z, w>| / |w|``; the paper's release bounds it through the Lipschitz constant
of the softmax instead: ``|z| * (1 - s / (s + 2 |P(u|x) - 1/2|))``, at most ``|z| / (s + 1)``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def exact_radius(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Distance of each embedding (rows of ``z``) to the decision hyperplane <z, w> = 0."""
    return (z @ w).abs() / w.norm()


def release_bound(z: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """The authors' release's radius, from P(u|x) = sigmoid(s <z/|z|, w>)."""
    p = torch.sigmoid(scale * F.normalize(z, dim=-1) @ w)
    return z.norm(dim=-1) * (1 - scale / (scale + 2 * (p - 0.5).abs()))


def worst_case_perturbation(z: torch.Tensor, w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The perturbation of the given norms that moves each z straight toward the hyperplane."""
    direction = -torch.sign(z @ w)[:, None] * F.normalize(w, dim=0)[None, :]
    return norm[:, None] * direction


def search_flip(z: torch.Tensor, w: torch.Tensor, norm: torch.Tensor, steps: int = 100,
                lr: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Projected gradient search, within an L2 ball of radius ``norm`` per row, for the
    perturbation that most pushes each decision toward flipping. Returns the perturbations."""
    generator = torch.Generator().manual_seed(seed)
    side = torch.sign(z @ w)[:, None]
    delta = torch.randn(z.shape, generator=generator) * 1e-3
    delta.requires_grad_(True)
    for _ in range(steps):
        objective = (side * ((z + delta) @ w)[:, None]).sum()  # minimise the signed margin
        (grad,) = torch.autograd.grad(objective, delta)
        with torch.no_grad():
            delta -= lr * norm[:, None] * F.normalize(grad, dim=-1)
            excess = (delta.norm(dim=-1) / norm).clamp(min=1)
            delta /= excess[:, None]
    return delta.detach()


def certify_embeddings(z: torch.Tensor, w: torch.Tensor, scale: float, p: dict) -> dict:
    """Radii, bound and verification counts for raw embeddings ``z`` and direction ``w``: a push
    of R(1+eps) along the worst direction must flip the side, a search within R(1-eps) must not
    (``p``: the ``certify`` params)."""
    e = F.normalize(z, dim=-1)
    out = {"radius": exact_radius(z, w), "radius_normalized": exact_radius(e, w),
           "release_bound": release_bound(z, w, scale)}
    violations = {}
    for name, emb, radius in (("raw", z, out["radius"]), ("normalized", e, out["radius_normalized"])):
        side = torch.sign(emb @ w)
        pushed = emb + worst_case_perturbation(emb, w, radius * (1 + p["eps"]))
        searched = emb + search_flip(emb, w, radius * (1 - p["eps"]), p["search_steps"],
                                     p["search_lr"], p["seed"])
        violations[f"outside_not_flipped_{name}"] = int((torch.sign(pushed @ w) == side).sum())
        violations[f"inside_flipped_{name}"] = int((torch.sign(searched @ w) != side).sum())
    return {**{k: v.numpy() for k, v in out.items()}, "violations": violations}


def certified_accuracy(radius: np.ndarray, blocked: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Fraction of (unacceptable) images that are blocked with a radius of at least r."""
    return np.array([(blocked & (radius >= r)).mean() for r in grid])
