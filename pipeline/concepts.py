"""Concepts as data: the registry in ``data/concepts.yaml`` and the aligned prompt pairs made
from its templates (pairs differ only in the concept text, METHOD section 3)."""
from __future__ import annotations

import copy
import itertools
import string
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.schema import MINI_SLOTS, ParamsError, Registry, read_yaml_file, validate

REGISTRY_FILE = Path("data/concepts.yaml")
SPLITS = ("train", "val", "test")


class UnknownConceptError(ValueError):
    """A concept or setting the registry does not know; the message lists the known ones."""


@dataclass(frozen=True)
class Concept:
    name: str
    setting: str
    unacceptable: str
    acceptable: str
    kind: str
    i2p_category: str | None = None
    shows: dict[str, str] | None = None  # mini: the judge's {head: value} that means c_u


def load_registry(path: Path = REGISTRY_FILE) -> dict:
    """The registry, checked (``pipeline.schema.Registry``: duplicate names, blank texts,
    c_u = c_a, unknown kinds or judge verdicts...); else ``ParamsError``, one line per problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root (where dvc.yaml is).")
    registry = read_yaml_file(path, str(path))
    validate(Registry, registry, str(path))
    return registry


def known_concepts(setting: str, path: Path = REGISTRY_FILE) -> list[str]:
    concepts = load_registry(path)["concepts"]
    if setting not in concepts:
        raise UnknownConceptError(f"unknown setting {setting!r}; known: {sorted(concepts)}")
    return sorted(concepts[setting])


def get_concept(name: str, setting: str, path: Path = REGISTRY_FILE) -> Concept:
    """The registry entry for ``name`` in ``setting``, validated."""
    known = known_concepts(setting, path)
    if name not in known:
        raise UnknownConceptError(
            f"unknown concept {name!r} for setting {setting!r}; known: {', '.join(known)}")
    return Concept(name=name, setting=setting, **load_registry(path)["concepts"][setting][name])


def _slots(setting: str, path: Path) -> dict[str, list[str]]:
    if setting == "mini":
        return MINI_SLOTS
    return load_registry(path)["slots"][setting]


def pair_pool(concept: Concept, path: Path = REGISTRY_FILE) -> list[tuple[str, str]]:
    """Every ``(unacceptable, acceptable)`` pair the concept's templates can make, in a fixed
    order, keeping a pair only if neither of its sentences was made before (so that no sentence
    can fall into two splits)."""
    templates = load_registry(path)["templates"][concept.setting][concept.kind]
    slots = _slots(concept.setting, path)
    pool, seen = [], set()
    for template in templates:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        for values in itertools.product(*(slots[name] for name in names)):
            fill = dict(zip(names, values))
            pair = tuple(template.replace("{}", c).format(**fill)
                         for c in (concept.unacceptable, concept.acceptable))
            if not seen & set(pair):
                pool.append(pair)
                seen.update(pair)
    return pool


def check_context(prompts: list[str], tokenizer, source: str = str(REGISTRY_FILE)) -> None:
    """Every prompt whole within the text encoder's context (``tokenizer.model_max_length``
    tokens): what is past it is cut, so c_u's and c_a's prompts, or a training and a held-out
    one, that differ only there would be one prompt to the model. ParamsError naming the longest
    prompt otherwise."""
    lengths = [len(ids) for ids in tokenizer(list(prompts)).input_ids]
    longest = max(range(len(prompts)), key=lengths.__getitem__, default=None)
    if longest is not None and lengths[longest] > tokenizer.model_max_length:
        shown = textwrap.shorten(prompts[longest], 60, placeholder="...")
        raise ParamsError(f"{source}: the prompt {shown!r} is {lengths[longest]} "
                          f"tokens, more than the text encoder's {tokenizer.model_max_length} "
                          "(prompts differing past them would be one): shorten the concept "
                          "texts or templates")


def split_sizes(sizes: dict[str, int], available: int) -> dict[str, int]:
    """Pairs per split: ``sizes`` when the pool holds enough; else the pool divided so that
    validation and test get a quarter each (at least one pair) and training the rest."""
    if available >= sum(sizes.get(split, 0) for split in SPLITS):
        return {split: sizes.get(split, 0) for split in SPLITS}
    held_out = max(1, available // 4)
    if available < 3:
        raise ValueError(f"only {available} distinct prompt pairs: disjoint train/val/test "
                         "splits need at least 3; add templates in data/concepts.yaml")
    return {"train": available - 2 * held_out, "val": held_out, "test": held_out}


def prompt_pairs(concept: Concept, sizes: dict[str, int], seed: int,
                 path: Path = REGISTRY_FILE) -> dict[str, list[tuple[str, str]]]:
    """Train/val/test lists of ``(unacceptable prompt, acceptable prompt)`` pairs drawn from
    :func:`pair_pool` by a seeded shuffle. The splits never share a sentence; their sizes are
    :func:`split_sizes` (a mini character's 17 pairs give 9/4/4, and the generate stage raises
    images per prompt to keep each split's image count)."""
    pool = pair_pool(concept, path)
    order = np.random.default_rng(seed).permutation(len(pool))
    counts = split_sizes(sizes, len(pool))
    bounds = np.cumsum([0] + [counts[split] for split in SPLITS])
    return {split: [pool[i] for i in order[bounds[k]:bounds[k + 1]]]
            for k, split in enumerate(SPLITS)}


#: Words that say where or how, not what: a concept text "names" a prompt only by its other words.
_FUNCTION_WORDS = frozenset("a an the of in on at by with against over background".split())


def _content_words(text: str) -> frozenset[str]:
    words = "".join(ch if ch.isalnum() else " " for ch in text.casefold()).split()
    return frozenset(words) - _FUNCTION_WORDS


def names_concept(prompt: str, concept: Concept) -> bool:
    """True if ``prompt`` names c_u or c_a of ``concept``: holds every content word of either
    text ("a red star" names "a star"; "a striped circle against a white background" names "on a
    white background")."""
    words = _content_words(prompt)
    return any(_content_words(text) <= words for text in (concept.unacceptable, concept.acceptable))


def everyday_prompts(concepts: list[Concept], count: int, seed: int,
                     path: Path = REGISTRY_FILE) -> list[str]:
    """``count`` distinct prompts that name neither c_u nor c_a of any of ``concepts`` (one for a
    stage, all of a multi-concept checker's), drawn by ``seed``: what a platform serves most.

    Mini: the world's own captions of random scenes (characters included) whose scene shows no
    concept's c_u, each caption stating the attributes the concepts are about (so a "red circle"
    is drawn on a stated grey background, not on a background the model picks). Paper: every fill
    of the registry's everyday templates, shuffled. Fewer than ``count`` such prompts raise
    ``ValueError`` naming the shortfall."""
    return [prompt.text for prompt in everyday_draw(concepts, count, seed, path)]


@dataclass(frozen=True)
class EverydayPrompt:
    """One everyday prompt and, per concept name, the same prompt with that concept's c_u put
    into it (None where the concept cannot be put into that scene): the everyday anchors and
    their in-context twins (docs/method.md, "Images of neither concept")."""

    text: str
    in_context: dict[str, str | None]


def everyday_draw(concepts: list[Concept], count: int, seed: int,
                  path: Path = REGISTRY_FILE) -> list[EverydayPrompt]:
    """The draw of :func:`everyday_prompts` (the same texts, in the same order), each with its
    in-context twins.

    The twin says the same scene with the concept in it, so that an image of c_u in an everyday
    context meets a whole caption of itself, as an everyday image meets its own caption among the
    anchors. Mini: the scene with the concept's ``shows`` attribute set (a character takes the
    scene's place, keeping its background), captioned from the same random state as the
    prompt ("a dotted arrow on a brown background" -> "a checkered arrow on a brown
    background"); a texture or colour cannot be put on a character (None). Paper: the concept's
    template that shares the most slots with the prompt's, filled with the prompt's values (a
    ``thing`` stands in for a ``subject``); None where no template's slots are all there."""
    settings = {c.setting for c in concepts}
    if len(settings) != 1:
        raise ValueError(f"everyday prompts need concepts of one setting; got {sorted(settings)}")
    rng = np.random.default_rng(seed)
    prompts: dict[str, EverydayPrompt] = {}
    if settings == {"mini"}:
        from pipeline.mini import shapes

        shown = [next(iter(c.shows.items())) for c in concepts]
        keep = {head for head, _ in shown} & {"texture", "color", "background"}
        for _ in range(200 * count):
            scene = shapes.sample_scene(rng)
            if any(getattr(scene, head) == value for head, value in shown):
                continue
            state = copy.deepcopy(rng.bit_generator.state)
            text, _ = shapes.caption(scene, rng, keep=keep)
            if not any(names_concept(text, c) for c in concepts) and text not in prompts:
                prompts[text] = EverydayPrompt(text, {
                    c.name: _mini_in_context(scene, state, keep, c) for c in concepts})
            if len(prompts) == count:
                return list(prompts.values())
    else:
        registry = load_registry(path)
        slots = registry["slots"]["paper"]
        pool = []
        for template in registry["everyday"]["paper"]:
            names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
            for values in itertools.product(*(slots[name] for name in names)):
                fill = dict(zip(names, values))
                text = template.format(**fill)
                if text not in prompts and not any(names_concept(text, c) for c in concepts):
                    prompts[text] = EverydayPrompt(text, {
                        c.name: _paper_in_context(fill, c, registry) for c in concepts})
                    pool.append(text)
        if len(pool) >= count:
            return [prompts[pool[i]] for i in rng.permutation(len(pool))[:count]]
    raise ValueError(f"only {len(prompts)} distinct everyday prompts name none of "
                     f"{', '.join(c.name for c in concepts)}; lower everyday.prompts to at most "
                     f"{len(prompts)} or add everyday templates in data/concepts.yaml")


def _mini_in_context(scene, state: dict, keep: set[str], concept: Concept) -> str | None:
    """The caption of ``scene`` with ``concept``'s c_u in it, from the random ``state`` its own
    caption was drawn from (:func:`everyday_draw`)."""
    from pipeline.mini import shapes

    head, value = next(iter(concept.shows.items()))
    if head == "character":
        changed = replace(scene, character=value, shape=shapes.CHARACTERS[value].shape,
                          color=None, texture="plain")
    elif scene.character is not None and head in ("texture", "color"):
        return None
    else:
        changed = replace(scene, **{head: value})
    rng = np.random.default_rng()
    rng.bit_generator.state = copy.deepcopy(state)
    return shapes.caption(changed, rng, keep=keep)[0]


def _paper_in_context(fill: dict[str, str], concept: Concept, registry: dict) -> str | None:
    """``concept``'s template sharing the most slots with an everyday prompt's ``fill``, filled
    with its values (:func:`everyday_draw`)."""
    values = {"subject": fill["thing"], **fill} if "thing" in fill else dict(fill)
    best, shared = None, -1
    for template in registry["templates"]["paper"][concept.kind]:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        if names <= values.keys() and len(names) > shared:
            best, shared = template, len(names)
    return None if best is None else best.replace("{}", concept.unacceptable).format(**values)
