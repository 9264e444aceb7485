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
from typing import TYPE_CHECKING

import numpy as np

from pipeline.espresso.files import write_csv
from pipeline.headline import write_results
from pipeline.outputs.finetuned import FILTER_DIR
from pipeline.outputs.generated import MANIFEST, load_images
from pipeline.params import mark_budget, run_stage, settings_of
from pipeline.schema import Params

if TYPE_CHECKING:
    import torch

    from pipeline.espresso import EspressoFilter

REPORTS = Path("reports/certify")
ATTACK_DIR = Path("data/attack")
CERTIFIED_FILTERS = ("zero_shot", "espresso")
NEEDS = {MANIFEST: "generate", FILTER_DIR: "finetune", ATTACK_DIR: "attack"}


def attack_movement(filt: EspressoFilter, clean: torch.Tensor, clean_radius: np.ndarray) -> dict:
    """Per attack run of the attack stage (all its seeds): distance of each attack image's unit embedding to the
    nearest clean unacceptable test image's, against that clean image's certified radius."""
    import torch
    import torch.nn.functional as F

    from pipeline.espresso import blocks
    from pipeline.espresso.metrics import proportion

    out = {}
    for run in sorted(path for path in ATTACK_DIR.iterdir() if path.is_dir()):
        images = np.concatenate([np.load(seed)["images"] for seed in sorted(run.glob("*.npz"))])
        adv = F.normalize(filt.embed(images), dim=-1)
        distance = torch.cdist(adv, clean)
        nearest = distance.argmin(1)
        moved = distance.min(1).values.numpy()
        margin = filt.margin(adv).numpy()
        out[run.name] = {"median_distance_moved": float(np.median(moved)),
                          "median_radius_of_nearest_clean": float(np.median(clean_radius[nearest])),
                          "share_moved_beyond_radius": proportion(moved > clean_radius[nearest]),
                          "share_passed": proportion(~blocks(margin))}
    return out


def run(params: Params) -> dict:
    import pandas as pd
    import torch.nn.functional as F

    from pipeline.espresso import EspressoFilter, blocks
    from pipeline.espresso.certificate import certified_accuracy, certify_embeddings

    setting, concept, models = settings_of(params)
    p = params.certify
    manifest = pd.read_csv(MANIFEST)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    unacceptable = (test["label"] == "unacceptable").to_numpy(copy=True)
    images = load_images(test)
    filters = {"zero_shot": EspressoFilter.from_clip(models.clip, concept.unacceptable,
                                                     concept.acceptable),
               "espresso": EspressoFilter.from_pretrained(FILTER_DIR)}
    table = test[["prompt", "seed", "label"]].copy()
    metrics, curves = {}, {}
    grid = None
    for name, filt in filters.items():
        z = filt.embed(images)
        result = certify_embeddings(z, filt.direction, filt.logit_scale, p.model_dump())
        blocked = blocks(filt.margin(z)).numpy()
        for key in ("radius", "radius_normalized", "release_bound"):
            table[f"{name}_{key}"] = result[key]
        table[f"{name}_blocked"] = blocked
        ratio = result["radius"] / np.maximum(result["release_bound"], 1e-12)
        radius = result["radius_normalized"]
        if grid is None:
            grid = np.linspace(0, np.quantile(radius, 0.99) * 1.5, p.curve_points)
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
    write_results(REPORTS, "certify", mark_budget(metrics, params))
    write_csv(REPORTS / "radii.csv", table)
    write_csv(REPORTS / "certified_accuracy.csv",
              pd.DataFrame({"radius": grid, **curves}))
    return metrics


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
