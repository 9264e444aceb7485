"""DVC stage ``certify``: certified robustness of Espresso's decision (METHOD section 7).

For every test image and both CLIP filters (zero-shot, fine-tuned): the exact radius
R = |<z, w>| / |w| (raw embedding z and unit embedding e), the release's bound, and their ratio.
The certificate is verified, not assumed: a perturbation of norm R(1+eps) along the worst
direction must flip the decision, and projected-gradient search within R(1-eps) must never flip
it; violations are counted as metrics (expected 0). Then: certified accuracy against radius for
unacceptable test images, and how far each attack's images moved in embedding space compared with
the clean images' radii.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.certify_math import (exact_radius, release_bound, search_flip,
                                   worst_case_perturbation)
from pipeline.espresso import EspressoFilter
from pipeline.files import write_csv, write_json
from pipeline.finetune import FILTER_DIR
from pipeline.generate import MANIFEST, load_images
from pipeline.metrics import proportion
from pipeline.params import run_stage, settings_of

REPORTS = Path("reports/certify")
ATTACK_DIR = Path("data/attack")
CERTIFIED_FILTERS = ("zero_shot", "espresso")


def certify_embeddings(z: torch.Tensor, w: torch.Tensor, scale: float, p: dict) -> dict:
    """Radii, bound and verification counts for raw embeddings ``z`` and direction ``w``."""
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


def attack_movement(filt: EspressoFilter, clean: torch.Tensor, clean_radius: np.ndarray) -> dict:
    """Per attack of the attack stage: distance of each attack image's unit embedding to the
    nearest clean unacceptable test image's, against that clean image's certified radius."""
    out = {}
    for path in sorted(ATTACK_DIR.glob("*.npz")):
        adv = F.normalize(filt.embed(np.load(path)["images"]), dim=-1)
        distance = torch.cdist(adv, clean)
        nearest = distance.argmin(1)
        moved = distance.min(1).values.numpy()
        margin = (adv @ filt.direction).numpy()
        out[path.stem] = {"median_distance_moved": float(np.median(moved)),
                          "median_radius_of_nearest_clean": float(np.median(clean_radius[nearest])),
                          "share_moved_beyond_radius": proportion(moved > clean_radius[nearest]),
                          "share_passed": proportion(margin <= 0)}
    return out


def run(params: dict) -> dict:
    setting, concept, models = settings_of(params)
    p = params["certify"]
    manifest = pd.read_csv(MANIFEST)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    unacceptable = (test["label"] == "unacceptable").to_numpy(copy=True)
    images = load_images(test)
    filters = {"zero_shot": EspressoFilter.from_clip(models["clip"], concept.unacceptable,
                                                     concept.acceptable),
               "espresso": EspressoFilter.from_pretrained(FILTER_DIR)}
    table = test[["prompt", "seed", "label"]].copy()
    metrics, curves = {}, {}
    grid = None
    for name, filt in filters.items():
        z = filt.embed(images)
        result = certify_embeddings(z, filt.direction, filt.logit_scale, p)
        blocked = (z @ filt.direction > 0).numpy()
        for key in ("radius", "radius_normalized", "release_bound"):
            table[f"{name}_{key}"] = result[key]
        table[f"{name}_blocked"] = blocked
        ratio = result["radius"] / np.maximum(result["release_bound"], 1e-12)
        radius = result["radius_normalized"]
        if grid is None:
            grid = np.linspace(0, np.quantile(radius, 0.99) * 1.5, p["curve_points"])
        curves[name] = certified_accuracy(radius[unacceptable], blocked[unacceptable], grid)
        metrics[name] = {
            **{f"radius_normalized_{q}": float(np.quantile(radius, q / 100))
               for q in (10, 50, 90)},
            "radius_median": float(np.median(result["radius"])),
            "release_bound_median": float(np.median(result["release_bound"])),
            "exact_over_release_median": float(np.median(ratio)),
            "violations": result["violations"],
            "attacks": attack_movement(filt, F.normalize(z[unacceptable], dim=-1),
                                       radius[unacceptable]),
        }
    metrics["total_violations"] = sum(v for f in CERTIFIED_FILTERS
                                      for v in metrics[f]["violations"].values())
    write_json(REPORTS / "metrics.json", metrics)
    write_csv(REPORTS / "radii.csv", table)
    write_csv(REPORTS / "certified_accuracy.csv",
              pd.DataFrame({"radius": grid, **curves}))
    return metrics


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
