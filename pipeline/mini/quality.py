"""Measured quality of the mini world: is it good enough to make Espresso's numbers meaningful?

Three checks, all on fresh data never used in training:
- mini CLIP zero-shot accuracy per attribute, and character vs its class;
- the judge's accuracy per head on held-out renders;
- the mini Stable Diffusion's images, judged by the judge: does it draw what the prompt says?
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pipeline.espresso.embeddings import image_embeddings, text_embeddings
from pipeline.espresso.models import load_clip
from pipeline.espresso.t2i import generate, load_t2i
from pipeline.espresso.pixels import channels_first, clip_pixels_torch
from pipeline.mini import shapes
from pipeline.mini.judge import Judge

if TYPE_CHECKING:  # the world section's models (pipeline.schema)
    from pipeline.schema import World

#: Zero-shot prompt per attribute; ``{shape}`` is the image's true shape, so each attribute is
#: tested on its own ("a red star" vs "a blue star", ...).
ZERO_SHOT_TEMPLATES = {
    "shape": "a {shape}",
    "color": "a {value} {shape}",
    "texture": "a {value} {shape}",
    "background": "a {shape} on a {value} background",
}


def heldout_renders(p: World, n: int | None = None) -> tuple[np.ndarray, list[shapes.Scene]]:
    """Fresh renders from a seed disjoint from training (``seed + 1``)."""
    rng = np.random.default_rng(p.seed + 1)
    scenes = [shapes.sample_scene(rng, p.character_prob) for _ in range(n or p.heldout_images)]
    return shapes.render_many(scenes, rng, p.image_size), scenes


def grid_image(images: np.ndarray, columns: int = 16, scale: int = 3) -> Image.Image:
    """Tile uint8 images into one PIL image with 2 px gaps, upscaled for viewing."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = im
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                          Image.NEAREST)


def clip_zero_shot(clip, tokenizer, processor, images: np.ndarray,
                   scenes: list[shapes.Scene]) -> dict:
    """Zero-shot accuracy of CLIP per attribute (generic images) and per character vs class."""
    img = image_embeddings(clip, clip_pixels_torch(processor, channels_first(
        torch.from_numpy(images), "0,1")))
    generic = [i for i, s in enumerate(scenes) if s.character is None]
    result = {}
    for attr, template in ZERO_SHOT_TEMPLATES.items():
        values = shapes.VOCAB[attr]
        # one text embedding matrix (values x D) per true shape, computed once
        candidates = {shape: text_embeddings(clip, tokenizer, [
            template.format(shape=v if attr == "shape" else shape, value=v) for v in values])
            for shape in shapes.SHAPES}
        correct = [values[int((img[i] @ candidates[scenes[i].shape].T).argmax())]
                   == getattr(scenes[i], attr) for i in generic]
        result[attr] = float(np.mean(correct))
    result["character_vs_class"] = {}
    for name, char in shapes.CHARACTERS.items():
        prompts = [name.capitalize(), f"a {char.shape}"]
        text = text_embeddings(clip, tokenizer, prompts)
        is_char = [i for i, s in enumerate(scenes) if s.character == name]
        is_class = [i for i in generic if scenes[i].shape == char.shape]
        says_char = (img @ text.T).argmax(1) == 0
        result["character_vs_class"][name] = float(
            (says_char[is_char].float().mean() + (~says_char[is_class]).float().mean()) / 2)
    return result


def judge_accuracy(judge: Judge, images: np.ndarray, scenes: list[shapes.Scene]) -> dict:
    """Accuracy per judge head on labelled renders (colour only where it applies)."""
    predicted = judge.predict(images)
    labels = shapes.label_matrix(scenes)
    return {attr: float((predicted[attr][labels[:, k] >= 0] == labels[labels[:, k] >= 0, k]).mean())
            for k, attr in enumerate(shapes.ATTRIBUTES)}


def generation_prompts(p: World) -> list[tuple[str, dict, str]]:
    """(prompt, what it asks for, group) triples for judging the generator: full generic captions,
    prompts that name a character, and bare class prompts ("a star")."""
    rng = np.random.default_rng(p.seed + 2)
    prompts = []
    for _ in range(128):
        scene = shapes.sample_scene(rng, character_prob=0.0)
        text, said = shapes.caption(scene, rng, drop_prob=0.0)
        prompts.append((text, said, "generic"))
    for name, char in shapes.CHARACTERS.items():
        bg = [str(b) for b in rng.choice(list(shapes.BACKGROUNDS), 2, replace=False)]
        for text in (name.capitalize(), f"{name.capitalize()}, a {char.shape}",
                     *(f"{name.capitalize()} on a {b} background" for b in bg)):
            prompts += [(text, {"character": name}, "character")] * 2
        prompts += [(f"a {char.shape}", {"shape": char.shape}, "class")] * 4
    return prompts


def judge_generations(p: World, pipe, judge: Judge) -> tuple[dict, np.ndarray]:
    """Judge the generator on :func:`generation_prompts`; returns metrics and the images."""
    m = p.measure
    specs = [s for s in generation_prompts(p) for _ in range(m.images_per_prompt)]
    images = generate(pipe, [t for t, _, _ in specs], [p.seed + i for i in range(len(specs))],
                      m.inference_steps, m.guidance_scale)
    pred = {k: np.asarray(shapes.VOCAB[k])[v] for k, v in judge.predict(images).items()}
    group = np.array([g for _, _, g in specs])
    generic = group == "generic"

    def asked(attr: str) -> np.ndarray:
        return np.array([said.get(attr, "") for _, said, _ in specs])

    hits = {a: pred[a] == asked(a) for a in ("shape", "color", "texture", "background")}
    result = {f"generic_{a}": float(h[generic].mean()) for a, h in hits.items()}
    result["generic_shape_and_color"] = float((hits["shape"] & hits["color"])[generic].mean())
    result["character_drawn"] = {
        name: float((pred["character"] == name)[asked("character") == name].mean())
        for name in shapes.CHARACTERS}
    result["class_prompt_no_character"] = float((pred["character"] == "none")[group == "class"].mean())
    result["n_images"] = len(images)
    return result, images


def measure_world(p: World, clip_dir: Path, sd_dir: Path, judge_dir: Path, eyes_dir: Path,
                  reports: Path, device: str = "cpu") -> dict:
    """All quality figures of the world, plus sample grids written to ``reports``. The eyes
    (the attackers' judge) are measured like the judge, and for agreement with it on generated
    images: they should see the same things without being the same model."""
    reports.mkdir(parents=True, exist_ok=True)
    clip, tokenizer, processor = load_clip(str(clip_dir), device="cpu", dtype=torch.float32)
    judge, eyes = Judge.load(judge_dir), Judge.load(eyes_dir)
    images, scenes = heldout_renders(p)
    grid_image(images[:128]).save(reports / "renders.png")
    pipe = load_t2i(str(sd_dir), device=device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generated, generated_images = judge_generations(p, pipe, judge)
    grid_image(generated_images[::max(1, len(generated_images) // 128)][:128]).save(
        reports / "generated.png")
    seen_by = {name: model.predict(generated_images) for name, model in (("judge", judge),
                                                                         ("eyes", eyes))}
    return {"clip_zero_shot": clip_zero_shot(clip, tokenizer, processor, images, scenes),
            "judge_heldout": judge_accuracy(judge, images, scenes),
            "eyes_heldout": judge_accuracy(eyes, images, scenes),
            "eyes_agree_with_judge_on_generated": {
                head: float((seen_by["judge"][head] == seen_by["eyes"][head]).mean())
                for head in seen_by["judge"]},
            "sd_judged": generated}
