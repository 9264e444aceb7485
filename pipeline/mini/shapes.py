"""The mini world: procedurally rendered shapes with compositional captions.

The world stands in for the photographs Stable Diffusion draws: every image is one centred shape
with a colour, a texture and a background, or one of a few named *characters* (a fixed two-tone
look of a shape class, mimicking "Grumpy Cat" vs "cat"). Everything is deterministic given a
``numpy.random.Generator``, so the same seed always gives the same images and captions.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "crescent", "arrow")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "brown": (110, 70, 35),
}
#: Ways captions say where the shape is ("on a black background", "against a black background",
#: ...). A character's look is fixed, so its only captioned contexts are the backgrounds; the
#: wordings give it 1 + 4 x 4 = 17 distinct prompts, enough for disjoint train/val/test splits.
BACKGROUND_WORDINGS = ("on", "against", "over", "with")


@dataclass(frozen=True)
class Character:
    """A name that always means one look of a shape class: a coarse two-tone split that a
    small diffusion model learns quickly (small details such as faces are not learned)."""

    name: str
    shape: str
    colors: tuple[str, str]
    split: str  # "vertical" (left/right halves) or "horizontal" (top/bottom halves)


CHARACTERS = {
    c.name: c
    for c in (
        Character("zorbo", "star", ("red", "yellow"), "vertical"),
        Character("blip", "circle", ("cyan", "pink"), "horizontal"),
        Character("kroll", "square", ("purple", "orange"), "vertical"),
        Character("mimi", "heart", ("green", "yellow"), "horizontal"),
    )
}
#: Label vocabularies, in the order used by every classifier head (judge, zero-shot scoring).
VOCAB = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "texture": TEXTURES,
    "background": tuple(BACKGROUNDS),
    "character": ("none",) + tuple(CHARACTERS),
}


@dataclass(frozen=True)
class Scene:
    """What one image shows, plus the geometry that makes it a unique render.

    ``color`` is ``None`` for characters (their colours are fixed by the character)."""

    shape: str
    color: str | None
    texture: str
    background: str
    character: str | None = None
    cx: float = 0.5
    cy: float = 0.5
    radius: float = 0.35
    angle: float = 0.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def labels(self) -> dict[str, int]:
        """Integer label per head; -1 where the head does not apply (colour of a character)."""
        out = {k: VOCAB[k].index(getattr(self, k)) if getattr(self, k) is not None else -1
               for k in ("shape", "color", "texture", "background")}
        out["character"] = VOCAB["character"].index(self.character or "none")
        return out


def _geometry(rng: np.random.Generator) -> dict:
    return dict(
        cx=0.5 + rng.uniform(-0.08, 0.08),
        cy=0.5 + rng.uniform(-0.08, 0.08),
        radius=rng.uniform(0.30, 0.40),
        angle=rng.uniform(-15.0, 15.0),
        tint=tuple(float(t) for t in rng.uniform(0.9, 1.1, size=3)),
    )


def sample_scene(rng: np.random.Generator, character_prob: float = 0.2, **fixed) -> Scene:
    """A random scene; keyword arguments pin attributes (e.g. ``shape="star"``)."""
    character = fixed.pop("character", None)
    if character is None and "shape" not in fixed and "color" not in fixed \
            and rng.random() < character_prob:
        character = str(rng.choice(list(CHARACTERS)))
    attrs = dict(
        shape=str(rng.choice(SHAPES)),
        color=str(rng.choice(list(COLORS))),
        texture=str(rng.choice(TEXTURES)),
        background=str(rng.choice(list(BACKGROUNDS))),
    )
    attrs.update(fixed)
    if character is not None:
        if character not in CHARACTERS:
            raise ValueError(f"unknown character {character!r}; known: {sorted(CHARACTERS)}")
        attrs.update(shape=CHARACTERS[character].shape, color=None, texture="plain")
    return Scene(character=character, **attrs, **_geometry(rng))


def sample_group(rng: np.random.Generator, size: int = 4, character_prob: float = 0.2
                 ) -> tuple[list[Scene], str]:
    """``size`` scenes that differ in exactly one attribute (hard negatives for contrastive
    training). Returns the scenes and the name of the attribute that varies."""
    if rng.random() < character_prob:
        name = str(rng.choice(list(CHARACTERS)))
        base = sample_scene(rng, character=name)
        others = [sample_scene(rng, shape=base.shape, background=base.background)
                  for _ in range(size - 1)]
        return [base] + others, "character"
    attribute = str(rng.choice(["shape", "color", "texture", "background"]))
    values = rng.choice(VOCAB[attribute], size=size, replace=False)
    base = sample_scene(rng, character_prob=0.0)
    fixed = {k: getattr(base, k) for k in ("shape", "color", "texture", "background")}
    scenes = [sample_scene(rng, **{**fixed, attribute: str(v)}) for v in values]
    return scenes, attribute


def language() -> tuple[str, ...]:
    """Every word a caption of this world can use: the mini world's whole language (the
    mini models learn no other words, so attackers search within it)."""
    names = tuple(c.capitalize() for c in CHARACTERS)
    attributes = [w for key, words in VOCAB.items() if key != "character" for w in words]
    return tuple(dict.fromkeys(["a", "an", *BACKGROUND_WORDINGS, "background", ",", *attributes,
                                *names]))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator, drop_prob: float = 0.3,
            keep: Iterable[str] = ()) -> tuple[str, dict[str, str]]:
    """A caption for ``scene`` with each optional attribute dropped with ``drop_prob``
    (attributes in ``keep`` are never dropped). Returns the text and the attributes it states."""
    keep = set(keep)

    def stated(attr: str) -> bool:
        return attr in keep or rng.random() >= drop_prob

    said: dict[str, str] = {}
    if scene.character is not None:
        name = scene.character.capitalize()
        said["character"] = scene.character
        text = name
        if stated("shape") and rng.random() < 0.5:
            # "Zorbo, a star": relates the name to its class in text space, as real captions do.
            said["shape"] = scene.shape
            text += f", {_article(scene.shape)} {scene.shape}"
    else:
        words = []
        for attr in ("texture", "color"):
            if stated(attr):
                said[attr] = getattr(scene, attr)
                words.append(said[attr])
        said["shape"] = scene.shape
        words.append(scene.shape)
        text = f"{_article(words[0])} {' '.join(words)}"
    if stated("background"):
        said["background"] = scene.background
        wording = BACKGROUND_WORDINGS[int(rng.integers(len(BACKGROUND_WORDINGS)))]
        text += f" {wording} {_article(scene.background)} {scene.background} background"
    return text, said


def describes(said: dict[str, str], scene: Scene) -> bool:
    """True if a caption stating ``said`` correctly describes ``scene``. Generic captions
    ("a star") describe generic shapes only; a character is described by its name."""
    if (said.get("character") is None) != (scene.character is None):
        return False
    return all(getattr(scene, k) == v for k, v in said.items())


# ---- rendering -------------------------------------------------------------------------------

_SUPERSAMPLE = 4
_TEXTURE_PERIOD = 0.75  # in units of the shape radius: coarse enough to survive 32 px


def _outline(shape: str) -> np.ndarray:
    """Polygon of ``shape`` in unit coordinates (radius ~1, y down)."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    if shape in ("circle", "crescent"):
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.82
    if shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(a), np.sin(a)], 1) * 1.1 + [0, 0.12]
    if shape == "star":
        a = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2], 1) / 16.5
    if shape == "cross":
        w = 0.36
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                         [-w, w], [-1, w], [-1, -w], [-w, -w]])
    if shape == "arrow":
        return np.array([[-1, -0.3], [0.15, -0.3], [0.15, -0.75], [1, 0], [0.15, 0.75],
                         [0.15, 0.3], [-1, 0.3]])
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


_OUTLINES = {s: _outline(s) for s in SHAPES}


def _pattern_tone(rgb: np.ndarray) -> np.ndarray:
    """Second tone of a textured shape: darker for light colours, lighter for dark ones."""
    luminance = rgb @ np.array([0.299, 0.587, 0.114]) / 255
    target = 0.0 if luminance > 0.45 else 255.0
    return 0.5 * rgb + 0.5 * target


def render(scene: Scene, rng: np.random.Generator, size: int = 32,
           noise: float = 3.0) -> np.ndarray:
    """Render ``scene`` as a ``size x size x 3`` uint8 array (4x supersampled)."""
    big = size * _SUPERSAMPLE
    r = scene.radius * big
    centre = np.array([scene.cx, scene.cy]) * big
    theta = np.deg2rad(scene.angle)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])

    mask_img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask_img)
    draw.polygon([tuple(p) for p in _OUTLINES[scene.shape] @ rot.T * r + centre], fill=255)
    if scene.shape == "crescent":
        bite = rot @ np.array([0.5, -0.25]) * r + centre
        draw.ellipse([*(bite - 0.85 * r), *(bite + 0.85 * r)], fill=0)
    mask = np.asarray(mask_img) > 127

    ys, xs = np.mgrid[0:big, 0:big] + 0.5
    # shape-aligned coordinates in units of the radius (texture and split rotate with the shape)
    u = ((xs - centre[0]) * np.cos(theta) + (ys - centre[1]) * np.sin(theta)) / r
    v = (-(xs - centre[0]) * np.sin(theta) + (ys - centre[1]) * np.cos(theta)) / r

    tint = np.array(scene.tint)
    canvas = np.empty((big, big, 3))
    canvas[:] = np.clip(np.array(BACKGROUNDS[scene.background]) * tint, 0, 255)
    if scene.character is not None:
        char = CHARACTERS[scene.character]
        first, second = (np.clip(np.array(COLORS[c]) * tint, 0, 255) for c in char.colors)
        second_half = (u > 0) if char.split == "vertical" else (v > 0)
        canvas[mask & ~second_half] = first
        canvas[mask & second_half] = second
    else:
        base = np.clip(np.array(COLORS[scene.color]) * tint, 0, 255)
        p = _TEXTURE_PERIOD
        if scene.texture == "striped":
            marks = np.floor(v / (p / 2)) % 2 == 1
        elif scene.texture == "checkered":
            marks = (np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2 == 1
        elif scene.texture == "dotted":
            du, dv = (u % p) - p / 2, (v % p) - p / 2
            marks = du ** 2 + dv ** 2 <= (0.3 * p) ** 2
        else:
            marks = np.zeros_like(mask)
        canvas[mask] = base
        canvas[mask & marks] = _pattern_tone(base)

    small = Image.fromarray(canvas.astype(np.uint8)).resize((size, size), Image.BOX)
    out = np.asarray(small, dtype=np.float32) + rng.normal(0, noise, (size, size, 3))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render_many(scenes: list[Scene], rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Render a list of scenes into one ``N x size x size x 3`` uint8 array."""
    return np.stack([render(s, rng, size) for s in scenes]) if scenes else \
        np.zeros((0, size, size, 3), np.uint8)


def scene_table(scenes: list[Scene]) -> list[dict]:
    """Scenes as plain dicts (for pandas / JSON)."""
    return [asdict(s) for s in scenes]


ATTRIBUTES = ("shape", "color", "texture", "background", "character")


def caption_vector(said: dict[str, str]) -> np.ndarray:
    """A caption's stated attributes as label indices (-1 = not stated; a caption that names
    no character states character "none"), for vectorised :func:`describes`."""
    said = {"character": "none", **said}
    return np.array([VOCAB[a].index(said[a]) if a in said else -1 for a in ATTRIBUTES])


def label_matrix(scenes: list[Scene]) -> np.ndarray:
    """``N x 5`` label indices of scenes in :data:`ATTRIBUTES` order (-1 = not applicable)."""
    return np.array([[s.labels()[a] for a in ATTRIBUTES] for s in scenes], dtype=np.int64)


def describes_matrix(labels: np.ndarray, captions: np.ndarray) -> np.ndarray:
    """``[i, j]`` is True if caption ``j`` (a :func:`caption_vector`) describes scene ``i``:
    the vectorised form of :func:`describes`."""
    c = captions[None, :, :]
    return ((c == -1) | (c == labels[:, None, :])).all(-1)


def sampling_weights(scenes: list[Scene], character_share: float) -> np.ndarray:
    """Per-image sampling probabilities that give characters ``character_share`` of batches
    (they are rare in the hard-negative groups but must be learned by the generator)."""
    is_char = np.array([s.character is not None for s in scenes])
    w = np.where(is_char, character_share / is_char.sum(), (1 - character_share) / (~is_char).sum())
    return w / w.sum()


def _render_chunk(args: tuple[int, int, float]) -> tuple[np.ndarray, list[Scene], list[str]]:
    n_groups, seed, character_prob = args
    rng = np.random.default_rng(seed)
    scenes, varied = [], []
    for _ in range(n_groups):
        group, attribute = sample_group(rng, character_prob=character_prob)
        scenes += group
        varied += [attribute] * len(group)
    return render_many(scenes, rng), scenes, varied


def render_groups(n_groups: int, seed: int, character_prob: float = 0.2, workers: int = 2,
                  chunk: int = 500) -> tuple[np.ndarray, list[Scene], list[str]]:
    """Render ``n_groups`` hard-negative groups of 4 in parallel; deterministic in ``seed``
    whatever ``workers`` is. Returns images, scenes, and the attribute each group varies."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    sizes = [min(chunk, n_groups - i) for i in range(0, n_groups, chunk)]
    seeds = np.random.SeedSequence(seed).generate_state(len(sizes)).tolist()
    jobs = [(n, s, character_prob) for n, s in zip(sizes, seeds)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(tqdm(pool.map(_render_chunk, jobs), total=len(jobs), desc="render",
                          unit="chunk"))
    images = np.concatenate([p[0] for p in parts])
    return images, [s for p in parts for s in p[1]], [a for p in parts for a in p[2]]
