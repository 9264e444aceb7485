"""Throughput of the generate stage (issue 16), and its overhead over a bare diffusers call.

Targets: the stage's images/s at 1 and 2 processes (ratio), and its overhead over a bare
diffusers pipeline call on the same model and batches <= 1.05x.

- Processes (mini world): the stage command ``python -m pipeline.generate`` in a scratch folder
  (emptied before each run) with 1 process and with 2 (``torchrun``; CPU processes keep
  ``TORCH_THREADS`` threads each and wait passively, ``OMP_WAIT_POLICY=PASSIVE``), alternated
  round by round; images/s = images / the command's wall time (start, model load, generation,
  writes).
- Overhead (mini world, one process): the stage's whole function ``generate.run`` (planning,
  shard keys, one seeded generator per image, uint8 images, atomic ``.npz`` writes, checksums,
  manifest) against a bare diffusers loop on the same model, prompts and batches
  (``StableDiffusionPipeline.from_pretrained``, the same scheduler, one call per batch with one
  generator, ``output_type="np"``); each includes loading its model; alternated round by round,
  ratio = the median of the per-round ratios.
- ``--paper`` (a GPU): the overhead of ``pipeline.espresso.t2i.generate`` (per-image
  generators, uint8) over the bare call on SD v1.4's architecture with random weights at 512 px,
  50 DDIM steps, batch 8, fp16 (speed does not depend on weight values).

    python bench/bench_generate.py [--rounds 5] [--images 128]
    python bench/bench_generate.py --paper [--rounds 5]

Writes ``bench/generate_results.json`` (``generate_results_paper.json``); ratios are only
meaningful within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_params(images: int) -> dict:
    """params.yaml with ``images`` images in all (both labels), split 1/2 : 1/4 : 1/4 over
    train/val/test, in shards of one batch (so 2 processes can split them)."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    g = params["generate"]
    eighth = images // 8
    g.update(prompts={"train": 2 * eighth, "val": eighth, "test": eighth},
             images_per_prompt={"train": 1, "val": 1, "test": 1})
    g["shard_size"] = g["mini"]["batch"]
    return params


def scratch_folder(path: Path, params: dict) -> Path:
    import yaml

    shutil.rmtree(path, ignore_errors=True)
    (path / "data").mkdir(parents=True)
    for name in ("world", "concepts.yaml"):
        os.symlink(ROOT / "data" / name, path / "data" / name)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    return path


def stage_seconds(folder: Path, processes: int) -> float:
    """Wall time of the stage command on ``processes`` processes, from an empty output."""
    shutil.rmtree(folder / "data" / "generate", ignore_errors=True)
    launcher = (["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
                if processes > 1 else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *launcher, "-m", "pipeline.generate"], cwd=folder, env=env,
                   check=True, capture_output=True)
    return time.perf_counter() - start


def stage_vs_bare(folder: Path, params: dict) -> tuple[float, float]:
    """Seconds of ``generate.run`` and of the bare diffusers loop on the same work."""
    import torch
    from diffusers import StableDiffusionPipeline

    from pipeline import generate
    from pipeline.espresso.models import quiet_libraries
    from pipeline.espresso.t2i import scheduler_class
    from pipeline.params import check_params, settings_of

    here = os.getcwd()
    os.chdir(folder)
    try:
        shutil.rmtree("data/generate", ignore_errors=True)
        typed = check_params(params)
        start = time.perf_counter()
        manifest = generate.run(typed)
        stage = time.perf_counter() - start
    finally:
        os.chdir(here)
    _, _, models = settings_of(typed)
    sampler = typed.generate.mini
    start = time.perf_counter()
    with quiet_libraries():  # (its load report only)
        pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / models.t2i),
                                                       safety_checker=None)
    pipe.scheduler = scheduler_class(sampler.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    batch = sampler.batch
    for first in range(0, len(manifest), batch):
        rows = manifest.iloc[first:first + batch]
        pipe(rows["prompt"].tolist(), height=sampler.size, width=sampler.size,
             num_inference_steps=sampler.steps, guidance_scale=sampler.guidance,
             generator=torch.Generator().manual_seed(int(rows["seed"].iloc[0])),
             output_type="np")
    return stage, time.perf_counter() - start


def mini(rounds: int, images: int) -> dict:
    import torch

    from pipeline.params import TORCH_THREADS

    torch.set_num_threads(TORCH_THREADS)
    params = bench_params(images)
    folder = scratch_folder(Path("/tmp") / f"bench-generate-{os.getpid()}", params)
    try:
        n = 2 * sum(params["generate"]["prompts"].values())
        seconds = {1: [], 2: []}
        for r in range(rounds):
            for processes in ((1, 2) if r % 2 == 0 else (2, 1)):
                seconds[processes].append(stage_seconds(folder, processes))
        overhead = []
        for r in range(rounds):
            stage, bare = stage_vs_bare(folder, params)
            overhead.append(stage / bare)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    per_second = {p: n / statistics.median(s) for p, s in seconds.items()}
    return {"images": n, "rounds": rounds, "device": "cpu",
            "images_per_second": {f"{p} process{'es' if p > 1 else ''}": v
                                  for p, v in per_second.items()},
            "throughput_ratio_2_vs_1": per_second[2] / per_second[1],
            "overhead_vs_bare_diffusers": statistics.median(overhead),
            "overhead_quartiles": statistics.quantiles(overhead, n=4)[::2] if rounds > 1 else []}


def paper(rounds: int, steps: int = 50, size: int = 512, batch: int = 8) -> dict:
    """Overhead of ``t2i.generate`` over the bare call at SD v1.4's size (module docstring);
    on the CPU in fp32 where there is no GPU (a smoke test of the benchmark itself)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import AutoTokenizer, CLIPTextModel

    from pipeline.espresso.t2i import generate
    from pipeline.architectures import sd_v14_unet_and_vae, vit_l14_config

    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"),
                                                                          torch.float32)
    torch.manual_seed(0)
    unet, vae = sd_v14_unet_and_vae(size)
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=CLIPTextModel(vit_l14_config().text_config),
        tokenizer=AutoTokenizer.from_pretrained(str(ROOT / "data/world/clip")),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = [f"a photo of thing {i}" for i in range(batch)], list(range(batch))

    def ours():
        generate(pipe, prompts, seeds, steps, 7.5, size, batch)

    def bare():
        pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
             generator=torch.Generator().manual_seed(0), output_type="np")

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    ours(), bare()  # warm-up
    ratios, seconds = [], {"ours": [], "bare": []}
    for r in range(rounds):
        order = (("ours", ours), ("bare", bare))
        took = {name: timed(fn) for name, fn in (order if r % 2 == 0 else order[::-1])}
        for name, value in took.items():
            seconds[name].append(value)
        ratios.append(took["ours"] / took["bare"])
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "batch": batch, "steps": steps, "size": size,
            "rounds": rounds, "seconds_per_batch": {k: statistics.median(v)
                                                    for k, v in seconds.items()},
            "overhead_vs_bare_diffusers": statistics.median(ratios),
            "overhead_quartiles": statistics.quantiles(ratios, n=4)[::2] if rounds > 1 else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=128, help="mini world: images to generate")
    parser.add_argument("--paper", action="store_true", help="SD v1.4's size on a GPU")
    parser.add_argument("--steps", type=int, default=50, help="--paper: sampling steps")
    parser.add_argument("--size", type=int, default=512, help="--paper: image size")
    parser.add_argument("--batch", type=int, default=8, help="--paper: images per call")
    args = parser.parse_args()
    result = (paper(args.rounds, args.steps, args.size, args.batch) if args.paper
              else mini(args.rounds, args.images))
    print(json.dumps(result, indent=2))
    name = "generate_results_paper.json" if args.paper else "generate_results.json"
    (ROOT / "bench" / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
