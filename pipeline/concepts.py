"""Concepts as data: the registry in ``data/concepts.yaml`` and the aligned prompt pairs made
from its templates (pairs differ only in the concept text, METHOD section 3)."""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pipeline.mini import shapes

REGISTRY_FILE = Path("data/concepts.yaml")
KINDS = ("opposite", "broader_class", "style")
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


def _registry(path: Path = REGISTRY_FILE) -> dict:
    return yaml.safe_load(Path(path).read_text())


def known_concepts(setting: str, path: Path = REGISTRY_FILE) -> list[str]:
    concepts = _registry(path)["concepts"]
    if setting not in concepts:
        raise UnknownConceptError(f"unknown setting {setting!r}; known: {sorted(concepts)}")
    return sorted(concepts[setting])


def get_concept(name: str, setting: str, path: Path = REGISTRY_FILE) -> Concept:
    """The registry entry for ``name`` in ``setting``, validated."""
    known = known_concepts(setting, path)
    if name not in known:
        raise UnknownConceptError(
            f"unknown concept {name!r} for setting {setting!r}; known: {', '.join(known)}")
    entry = _registry(path)["concepts"][setting][name]
    if entry.get("kind") not in KINDS:
        raise UnknownConceptError(
            f"concept {name!r} in {path} has kind {entry.get('kind')!r}; allowed: {KINDS}")
    return Concept(name=name, setting=setting, **entry)


def _slots(setting: str, path: Path) -> dict[str, list[str]]:
    if setting == "mini":
        return {k: list(v) for k, v in shapes.VOCAB.items() if k != "character"}
    return _registry(path)["slots"][setting]


def prompt_pairs(concept: Concept, sizes: dict[str, int], seed: int,
                 path: Path = REGISTRY_FILE) -> dict[str, list[tuple[str, str]]]:
    """Train/val/test lists of ``(unacceptable prompt, acceptable prompt)`` pairs, ``sizes[split]``
    each. The splits share no prompt when the templates can make enough distinct pairs; a small
    world concept (a character has only a handful of prompts) cycles its pairs in every split,
    and the splits are then kept apart by their images' seeds."""
    templates = _registry(path)["templates"][concept.setting][concept.kind]
    slots = _slots(concept.setting, path)
    rng = np.random.default_rng(seed)
    wanted, pool, tries = sum(sizes.values()), [], 0
    while len(pool) < wanted and tries < 50 * wanted:
        tries += 1
        template = str(rng.choice(templates))
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        fill = {f: str(rng.choice(slots[f])) for f in names}
        pair = tuple(template.replace("{}", c).format(**fill)
                     for c in (concept.unacceptable, concept.acceptable))
        if pair not in pool:
            pool.append(pair)
    if len(pool) < wanted:
        return {split: [pool[i % len(pool)] for i in rng.permutation(sizes.get(split, 0))]
                for split in SPLITS}
    bounds = np.cumsum([0] + [sizes.get(split, 0) for split in SPLITS])
    return {split: pool[bounds[i]:bounds[i + 1]] for i, split in enumerate(SPLITS)}
