"""Calibrate the run planner's CPU minutes for the mini world (``python -m pipeline.plan``):
seconds per evaluation of each mini model on this machine's CPU, and a stage's fixed cost.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_plan_mini.py      # -> bench/plan_mini_results.json

Each model of ``pipeline.plan.MODELS`` runs forward on a batch of the size the stages use
(median of ``--repeats`` timed calls after a warm-up, torch's default threads: 2 on a 2-core
machine), divided by the batch: seconds per evaluation. The fixed cost of a stage is a fresh
Python process that imports the libraries and loads the mini SD and CLIP, as every stage does
before its work. The planner reads the file this writes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STARTUP = ("import torch, diffusers, transformers\n"
           "from pipeline.espresso import load_clip\n"
           "from pipeline.espresso.t2i import load_t2i\n"
           "load_clip('data/world/clip', 'cpu'); load_t2i('data/world/sd', 'cpu')\n")


def timed(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "plan_mini_results.json")
    args = parser.parse_args()

    load = os.getloadavg()[0]  # other work on the CPU slows every number below
    import torch

    from pipeline.espresso import load_clip
    from pipeline.espresso.t2i import load_t2i

    pipe = load_t2i(str(ROOT / "data/world/sd"), "cpu")
    clip, tokenizer, _ = load_clip(str(ROOT / "data/world/clip"), "cpu")
    unet, vae = pipe.unet, pipe.vae
    text_len = clip.config.text_config.max_position_embeddings
    latent = unet.config.sample_size
    image = clip.config.vision_config.image_size
    batch = {"unet": 64, "vae_decode": 32, "t2i_text": 64, "clip_text": 64, "clip_image": 64}
    tokens = torch.zeros(64, text_len, dtype=torch.long)
    context = torch.randn(batch["unet"], text_len, unet.config.cross_attention_dim)
    calls = {
        "unet": lambda: unet(torch.randn(batch["unet"], 4, latent, latent), 500,
                             encoder_hidden_states=context),
        "vae_decode": lambda: vae.decode(torch.randn(batch["vae_decode"], 4, latent, latent)),
        "t2i_text": lambda: pipe.text_encoder(tokens),
        "clip_text": lambda: clip.get_text_features(tokens),
        "clip_image": lambda: clip.get_image_features(torch.randn(batch["clip_image"], 3, image,
                                                                  image)),
    }
    seconds = {}
    with torch.inference_mode():
        for name, call in calls.items():
            seconds[name] = timed(call, args.repeats) / batch[name]
            print(f"{name:<11} {seconds[name] * 1e3:8.3f} ms per evaluation (batch {batch[name]})")
    starts = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", STARTUP], cwd=ROOT, check=True,
                       capture_output=True)
        starts.append(time.perf_counter() - start)
    startup = statistics.median(starts)
    print(f"stage start (imports, mini SD and CLIP loaded): {startup:.1f} s")
    args.out.write_text(json.dumps({
        "command": "OMP_WAIT_POLICY=PASSIVE python bench/bench_plan_mini.py",
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads",
        "load_average_1min_before_after": [load, os.getloadavg()[0]],
        "torch": torch.__version__, "batch": batch, "repeats": args.repeats,
        "seconds_per_evaluation": seconds, "stage_start_seconds": startup}, indent=2) + "\n")


if __name__ == "__main__":
    main()
