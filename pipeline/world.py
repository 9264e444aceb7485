"""DVC stage ``world``: build the offline mini world once (mini CLIP, mini Stable Diffusion, judge).

The stage is frozen in ``dvc.yaml`` and its outputs are committed to git, so a fresh clone never
rebuilds them. Rebuild everything with::

    dvc unfreeze world && dvc repro world && dvc freeze world

or one part at a time (``python -m pipeline.world clip|vae|judge|eyes|unet|measure``); the parts
``clip`` and ``vae``/``judge``/``eyes`` are independent and can run in parallel on separate cores.
``--device cuda`` trains on a GPU (minutes instead of an hour); the shipped world records where
it was built in ``reports/world/detail.json``.

The *eyes* are a second judge (another seed and a narrower network) that attackers use to look
at their trial images, so that attack success is never selected on the instrument that scores
it (METHOD section 6).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.espresso.files import atomic_dir, atomic_file
from pipeline.headline import write_results
from pipeline.mini import shapes
from pipeline.params import ParamsError, load_params, stage_parser
from pipeline.schema import World

if TYPE_CHECKING:
    import torch

OUT = Path("data/world")
REPORTS = Path("reports/world")
CACHE = Path(".cache/world")
CLIP_DIR, SD_DIR, JUDGE_DIR, EYES_DIR = OUT / "clip", OUT / "sd", OUT / "judge", OUT / "eyes"


def training_renders(p: World, workers: int = 2
                     ) -> tuple[np.ndarray, list[shapes.Scene], list[str]]:
    """The rendered training groups, cached on disk (rendering is deterministic in the seed)."""
    key = f"groups-s{p.seed}-n{p.train_groups}-c{p.character_prob}-{p.image_size}px"
    path = CACHE / f"{key}.npz"
    if path.exists():
        data = np.load(path)
        scenes = [shapes.Scene(**{**d, "tint": tuple(d["tint"])})
                  for d in json.loads(str(data["scenes"]))]
        return data["images"], scenes, data["varied"].tolist()
    images, scenes, varied = shapes.render_groups(p.train_groups, p.seed,
                                                  p.character_prob, workers)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, varied=np.array(varied),
                     scenes=np.array(json.dumps(shapes.scene_table(scenes))))
    return images, scenes, varied


def save_fp16(model: torch.nn.Module, folder: Path, *extras) -> None:
    """Save ``model`` (and processors/tokenizers in ``extras``) as fp16 safetensors, atomically.
    Stored in fp16 to halve the repository, computed in fp32: a transformers config (and each
    tower's sub-config) says ``"dtype": "float32"``, so that a plain ``from_pretrained``
    (transformers 5 follows the config's dtype) computes in fp32 like diffusers' parts of the
    mini pipeline."""
    import torch

    with atomic_dir(folder) as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        for extra in extras:
            extra.save_pretrained(tmp)
        config = tmp / "config.json"
        settings = json.loads(config.read_text())
        if "dtype" in settings:  # a transformers config, and its towers' (CLIPTextModel alone)
            for part in [settings] + [v for k, v in settings.items() if k.endswith("_config")]:
                part["dtype"] = "float32"
            config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    model.to(torch.float32)


def build_clip(p: World, device: str, workers: int) -> None:
    from pipeline.mini.clip import image_processor, train_clip
    from pipeline.mini.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(p.clip.context_length)
    images, scenes, varied = training_renders(p, workers)
    model = train_clip(p.clip, images, scenes, varied, tokenizer, p.seed, device)
    save_fp16(model, CLIP_DIR, tokenizer, image_processor(p.image_size))


def build_vae(p: World, device: str, workers: int) -> None:
    from pipeline.mini.sd import train_vae

    images, _, _ = training_renders(p, workers)
    save_fp16(train_vae(p.vae, images, p.seed, device), SD_DIR / "vae")


def build_judge(p: World, device: str, workers: int) -> None:
    from pipeline.mini.judge import train_judge

    images, scenes, _ = training_renders(p, workers)
    save_fp16(train_judge(p.judge, images, scenes, p.seed, device=device), JUDGE_DIR)


def build_eyes(p: World, device: str, workers: int) -> None:
    from pipeline.mini.judge import train_judge

    images, scenes, _ = training_renders(p, workers)
    save_fp16(train_judge(p.eyes, images, scenes, p.eyes.seed, device=device), EYES_DIR)


def build_unet(p: World, device: str, workers: int) -> None:
    import torch
    from diffusers import AutoencoderKL

    from pipeline.espresso.models import load_clip
    from pipeline.mini.sd import assemble_pipeline, link_text_side, train_unet

    clip, tokenizer, _ = load_clip(str(CLIP_DIR), device="cpu", dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(SD_DIR / "vae", torch_dtype=torch.float32)
    images, scenes, _ = training_renders(p, workers)
    unet = train_unet(p.unet, images, scenes, vae, clip.text_model, tokenizer, p.seed,
                      device=device)
    half = torch.float16
    pipe = assemble_pipeline(vae.to(half), unet.to(half), clip.text_model, tokenizer)
    with atomic_dir(SD_DIR) as tmp:
        pipe.save_pretrained(tmp)
        link_text_side(tmp, CLIP_DIR, final_sd_folder=SD_DIR)


def build_measure(p: World, device: str, workers: int) -> None:
    from pipeline.mini.quality import measure_world

    metrics = measure_world(p, CLIP_DIR, SD_DIR, JUDGE_DIR, EYES_DIR, REPORTS, device)
    write_results(REPORTS, "world", {**metrics, "built_on": device})


PARTS = {"clip": build_clip, "vae": build_vae, "judge": build_judge, "eyes": build_eyes,
         "unet": build_unet, "measure": build_measure}


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(sys.modules[__name__])
    # a str default: argparse (3.11) checks a list default against the choices as one value
    parser.add_argument("parts", nargs="*", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    parser.add_argument("--workers", type=int, default=2, help="processes that render images")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        p = load_params().world
    except ParamsError as err:
        sys.exit("\n".join(f"error: {line}" for line in str(err).splitlines()))
    parts = [args.parts] if isinstance(args.parts, str) else args.parts
    for part in PARTS if "all" in parts else parts:
        PARTS[part](p, args.device, args.workers)


if __name__ == "__main__":
    main()
