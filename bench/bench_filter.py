"""Cost of the Espresso filter per image at the paper's real architecture (CLIP ViT-L/14).

Cost does not depend on weight values, so the models are built from their configs with random
weights. Compared, from the same preprocessed pixels:
  (a) the bare CLIP image embedding (the floor: Espresso needs exactly this plus a dot product),
  (b) diffusers' ``StableDiffusionSafetyChecker`` (SD's default filter), built the same way.
Each variant runs in a fresh subprocess so its peak memory (max RSS) is its own.

    python bench/bench_filter.py [--repeats 3] [--batches 1 16]

Prints a table and writes ``bench/results.json``; ratios are only meaningful within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from pipeline.architectures import vit_l14_config

VARIANTS = ("image_embedding", "espresso", "safety_checker")


def measure(variant: str, batch: int, repeats: int) -> dict:
    """Seconds per image (median over ``repeats``) and peak RSS of one variant."""
    import torch
    from torch.utils import benchmark
    from transformers import CLIPImageProcessor, CLIPModel

    from pipeline.espresso import EspressoFilter
    from pipeline.mini.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = vit_l14_config()
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    if variant == "safety_checker":
        from diffusers.pipelines.stable_diffusion.safety_checker import \
            StableDiffusionSafetyChecker

        checker = StableDiffusionSafetyChecker(config).to(device, dtype).eval()
        images = [torch.zeros(3, 8, 8)] * batch
        fn = lambda: checker(images=images, clip_input=pixels)  # noqa: E731
    else:
        clip = CLIPModel(config).to(device, dtype).eval()
        if variant == "image_embedding":
            fn = lambda: clip.get_image_features(pixel_values=pixels).pooler_output  # noqa: E731
        else:
            filt = EspressoFilter(clip, build_clip_tokenizer(), CLIPImageProcessor(), "nude",
                                  "clean")
            fn = lambda: filt.p_unacceptable(filt.image_features(pixels))  # noqa: E731
    with torch.no_grad():
        fn()  # warm-up
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        seconds = timer.timeit(repeats).median
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "batch": batch, "device": str(device),
            "seconds_per_image": seconds / batch, "peak_memory_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.repeats)))
        return
    rows = []
    for batch in args.batches:
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--one", variant, str(batch),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True,
                                 check=True, cwd=Path(__file__).resolve().parents[1],
                                 env={**os.environ, "PYTHONPATH": "."})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for row in rows:
        floor = next(r for r in rows if r["batch"] == row["batch"]
                     and r["variant"] == "image_embedding")
        row["ratio_to_image_embedding"] = row["seconds_per_image"] / floor["seconds_per_image"]
    print(f"{'variant':<16}{'batch':>6}{'ms/image':>11}{'x embedding':>13}{'peak MiB':>10}")
    for r in rows:
        print(f"{r['variant']:<16}{r['batch']:>6}{1000 * r['seconds_per_image']:>11.1f}"
              f"{r['ratio_to_image_embedding']:>13.3f}{r['peak_memory_mib']:>10.0f}")
    Path(__file__).with_name("results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
