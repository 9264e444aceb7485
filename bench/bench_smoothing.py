"""What a pixel-space certificate costs (issue 29, ``pipeline.espresso.smoothing``): seconds per
certified image on this machine for the mini world, as a ratio to one plain check of the same
image in the same run, and the planner's estimate for SD v1.4's ViT-L/14 at paper scale.

    python bench/bench_smoothing.py             # -> bench/smoothing_results.json

Mini: the zero-shot Zorbo filter and the shipped six-concept checker, ``--images`` renders,
CERTIFY with n0 = 100 and n = ``--samples`` at sigma 0.25, then the attack on the smoothed
decision (``smoothed_attack``, 10 steps of 16 noise draws) on the same images. Paper: CERTIFY's
image-tower evaluations, (n0 + n) per image and sigma, times ViT-L/14's FLOPs per evaluation
(counted on the meta device), over the planner's GPU FLOP rate (``pipeline.plan``: the published
SD v1.4 A100 figure), as GPU-hours per 1,000 images and sigma at n = 1,000, 10,000 and 100,000
(Cohen et al.'s ImageNet n). A lower bound: the attack and the data movement are not counted.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "smoothing_results.json"


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def mini(images: int, samples: int) -> dict:
    import numpy as np
    import torch

    from pipeline.espresso import ConceptChecker, EspressoFilter
    from pipeline.espresso.smoothing import Smoothing, certify, smoothed_attack
    from pipeline.mini import shapes

    rng = np.random.default_rng(0)
    renders = list(shapes.render_many([shapes.sample_scene(rng) for _ in range(images)], rng))
    screens = {"zero-shot filter (zorbo)": EspressoFilter.from_clip(ROOT / "data/world/clip",
                                                                    "Zorbo", "a star"),
               "shipped checker (6 concepts)": ConceptChecker.from_pretrained(
                   ROOT / "data/checker", device="cpu")}
    smoothing = Smoothing(sigma=0.25, n=samples)
    out = {}
    for name, screen in screens.items():
        for p in screen.parameters():
            p.requires_grad_(False)
        check = getattr(screen, "check", None) or screen.screen
        plain = seconds(lambda: [check([im]) for im in renders]) / images
        cert = None

        def run():
            nonlocal cert
            cert = certify(screen, renders, smoothing)

        certified = seconds(run) / images
        attacked = seconds(lambda: smoothed_attack(screen, renders, cert, steps=10)) / images
        out[name] = {"plain_check_seconds": plain, "certify_seconds": certified,
                     "certify_over_plain": certified / plain,
                     "noisy_copies_per_image": smoothing.n0 + smoothing.n,
                     "smoothed_attack_seconds": attacked, "torch_threads":
                     torch.get_num_threads()}
        print(f"{name}: plain check {plain * 1e3:.1f} ms, certify {certified:.2f} s "
              f"({certified / plain:.0f}x, {smoothing.n0 + smoothing.n} copies), attack on the "
              f"smoothed decision {attacked:.2f} s per image")
    return out


def paper() -> dict:
    from pipeline import plan
    from pipeline.params import load_params

    params = load_params()
    flops = plan.flops_per_evaluation("paper", params)
    rate = flops["unet"] * 2 * plan.PUBLISHED_STEPS_PER_SECOND
    hours = {n: 1000 * (100 + n) * flops["clip_image"] / rate / 3600
             for n in (1_000, 10_000, 100_000)}
    for n, h in hours.items():
        print(f"paper (ViT-L/14, {flops['clip_image'] / 1e9:.0f} GFLOPs per image): n = {n:,}: "
              f"{h:.2f} GPU-hours per 1,000 images and sigma")
    return {"clip_image_flops": flops["clip_image"], "gpu_flop_rate": rate,
            "gpu_hours_per_1000_images_and_sigma": {str(n): h for n, h in hours.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    results = {"machine": platform.processor() or platform.machine(),
               "mini": mini(args.images, args.samples), "paper": paper()}
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
