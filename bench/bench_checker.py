"""Cost of the many-concept checker (METHOD section 9) at the paper's architecture, CLIP
ViT-L/14 built from its config with random weights (cost does not depend on weight values).

Targets (issue 15): with 14 concepts, the checker's diffusers safety-checker call costs <= 1.02x
the bare image embedding per image at batch 1 and 16, and its peak memory is no more than
diffusers' ``StableDiffusionSafetyChecker``'s. Since issue 27 every concept carries everyday
anchors (``--everyday-texts``, 64 as ``pipeline.export`` gives them; 0 for the paper's rule):
the gate's ``K x M x d`` product is part of the checker's call.

- Time: the bare embedding (``CLIPVisionModelWithProjection(pixel_values).image_embeds``) and
  the checker's full call on the same pixels (fail-closed checks, 14 scores, flags, blacking),
  on the same tower in one process, alternated round by round so that drift of a shared machine
  hits both alike; the ratio is the median of the per-round ratios.
- Memory: each model built and run once at the largest batch in a fresh process: peak RSS on
  CPU, ``torch.cuda.max_memory_allocated`` on a GPU.

    python bench/bench_checker.py [--rounds 15] [--batches 1 16] [--concepts 14] \
        [--everyday-texts 64]

Prints a table and writes ``bench/checker_results.json``; ratios are only meaningful within
one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MEMORY_VARIANTS = ("image_embedding", "checker", "safety_checker")


def vit_l14_vision():
    """OpenAI CLIP ViT-L/14's image tower and projection (``openai/clip-vit-large-patch14``)."""
    from transformers import CLIPConfig

    from pipeline.architectures import vit_l14_config

    config: CLIPConfig = vit_l14_config()
    return config, dict(config.vision_config.to_dict(), projection_dim=config.projection_dim)


def placement():
    import torch

    cuda = torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32


def image_tower():
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    device, dtype = placement()
    _, vision = vit_l14_vision()
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).to(device, dtype).eval()


def checker_on(tower, concepts: int, everyday_texts: int):
    """A checker of ``concepts`` random concept pairs on ``tower``, each with
    ``everyday_texts`` random everyday anchors (none: 0)."""
    import torch
    from torch.nn.functional import normalize
    from transformers import CLIPImageProcessor

    from pipeline.espresso import CheckerConcept, ConceptChecker

    dim = tower.config.projection_dim
    generator = torch.Generator().manual_seed(2)
    table = [CheckerConcept(f"concept{k}", f"unacceptable {k}", f"acceptable {k}",
                            normalize(torch.randn(dim, generator=generator), dim=0),
                            normalize(torch.randn(dim, generator=generator), dim=0), 100.0,
                            **({"t_n": normalize(torch.randn(everyday_texts, dim,
                                                             generator=generator), dim=-1),
                                "everyday_cut": 0.5} if everyday_texts else {}))
             for k in range(concepts)]
    return ConceptChecker(tower, CLIPImageProcessor(), table)


def call_of(variant: str, concepts: int, everyday_texts: int):
    """A call (images, pixel_values) -> output of ``variant``'s model, built fresh."""
    if variant == "safety_checker":
        from diffusers.pipelines.stable_diffusion.safety_checker import \
            StableDiffusionSafetyChecker

        device, dtype = placement()
        checker = StableDiffusionSafetyChecker(vit_l14_vision()[0]).to(device, dtype).eval()
        return lambda images, pixels: checker(images=images, clip_input=pixels)
    tower = image_tower()
    if variant == "image_embedding":
        return lambda images, pixels: tower(pixel_values=pixels).image_embeds
    checker = checker_on(tower, concepts, everyday_texts)
    return lambda images, pixels: checker(images=images, clip_input=pixels)


def inputs(batch: int):
    import torch

    device, dtype = placement()
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, 224, 224, generator=generator).to(device, dtype)
    images = torch.zeros(batch, 3, 8, 8, device=device)  # what diffusers hands over; tiny
    return images, pixels


def timed(fn, images, pixels) -> float:
    import torch

    if pixels.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        fn(images, pixels)
    if pixels.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_ratio(batch: int, rounds: int, concepts: int, everyday_texts: int) -> dict:
    """Bare embedding vs the checker on one shared tower, alternated per round."""
    tower = image_tower()
    checker = checker_on(tower, concepts, everyday_texts)
    bare = lambda images, pixels: tower(pixel_values=pixels).image_embeds  # noqa: E731
    full = lambda images, pixels: checker(images=images, clip_input=pixels)  # noqa: E731
    images, pixels = inputs(batch)
    for fn in (bare, full):
        timed(fn, images, pixels)  # warm-up
    seconds = {"image_embedding": [], "checker": []}
    for r in range(rounds):
        order = [("image_embedding", bare), ("checker", full)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            seconds[name].append(timed(fn, images, pixels))
    ratios = [c / b for b, c in zip(seconds["image_embedding"], seconds["checker"])]
    device, _ = placement()
    return {"batch": batch, "device": str(device), "concepts": concepts,
            "everyday_texts": everyday_texts, "rounds": rounds,
            **{f"{k}_ms_per_image": 1000 * statistics.median(v) / batch
               for k, v in seconds.items()},
            "ratio_median": statistics.median(ratios),
            "ratio_quartiles": statistics.quantiles(ratios, n=4)[::2]}


def peak_memory(variant: str, batch: int, concepts: int, everyday_texts: int) -> dict:
    import torch

    fn = call_of(variant, concepts, everyday_texts)
    images, pixels = inputs(batch)
    with torch.no_grad():
        fn(images, pixels)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if pixels.is_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "batch": batch, "peak_memory_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--concepts", type=int, default=14)
    parser.add_argument("--everyday-texts", type=int, default=64)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, max(args.batches), args.concepts,
                                     args.everyday_texts)))
        return
    root = Path(__file__).resolve().parents[1]
    memory = []
    for variant in MEMORY_VARIANTS:
        out = subprocess.run([sys.executable, "-m", "bench.bench_checker", "--memory-of", variant,
                              "--batches", *map(str, args.batches), "--concepts",
                              str(args.concepts), "--everyday-texts", str(args.everyday_texts)],
                             capture_output=True, text=True, check=True,
                             cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
        memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
    times = [time_ratio(batch, args.rounds, args.concepts, args.everyday_texts)
             for batch in args.batches]
    print(f"{'batch':>6}{'embedding ms/img':>18}{'checker ms/img':>16}{'ratio (median)':>16}"
          f"{'quartiles':>18}")
    for t in times:
        low, high = t["ratio_quartiles"]
        print(f"{t['batch']:>6}{t['image_embedding_ms_per_image']:>18.1f}"
              f"{t['checker_ms_per_image']:>16.1f}{t['ratio_median']:>16.4f}"
              f"{f'[{low:.3f}, {high:.3f}]':>18}")
    for m in memory:
        print(f"peak memory {m['variant']:<16} batch {m['batch']}: {m['peak_memory_mib']:.0f} MiB")
    result = {"time": times, "memory": memory}
    (root / "bench" / "checker_results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
