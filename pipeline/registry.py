"""The names of everything params.yaml may choose from a table of code: attacks, CRTs, filters,
optimisers, separation terms, vocabularies. One tuple per table, in the order the code and the
error messages list them.

Decision: the names live here, in one module that imports nothing heavy (no torch, no diffusers), and
the heavy tables are checked against them where they are built (:func:`implemented`). So:

- ``pipeline.schema`` reads its allowed names from here, and stays cheap to import (``--help``
  answers fast) without importing the attack, CRT or filter code; a stage's code deps grow by
  this one file, not by every attack's module (DVC deps follow imports);
- a table (``pipeline.attacks.ATTACKS``, ``pipeline.crts.EDITS``, ``pipeline.finetune.
  OPTIMIZERS``, ...) that names an entry this module does not, or misses one, fails when its
  module is imported, naming both lists: a name cannot be allowed by the schema and missing in
  the code, or the other way round.

The tables keep their plain imports of the code they hold (rather than resolving
``"module:object"`` strings here), so that what a stage runs is still read from its imports.
Adding an entry: its name here, its object in its table, and (for attacks and CRTs) its budget
class in ``pipeline.schema``.
"""
from __future__ import annotations

from typing import Mapping, TypeVar

from pipeline.espresso import filter_names

#: ``pipeline.attacks.ATTACKS``: the adversarial-prompt attacks (METHOD section 6).
ATTACKS = ("typo", "pez", "cce", "ringbell", "udiff")
#: The attacks that adapt to a filter (a term on its margin): ``attack.attacks``.
FILTER_ATTACKS = ("typo", "pez", "cce", "ringbell")
#: The attacks that adapt to an edited model by optimising through its UNet: ``attack.edit_attacks``.
EDIT_ATTACKS = ("cce", "udiff")
#: ``pipeline.attacks.ringbell.OPERATORS``: Ring-A-Bell's genetic operators.
RINGBELL_OPERATORS = ("ours", "release")
#: ``pipeline.crts.EDITS``: the fine-tuning CRTs (METHOD section 8).
CRTS = ("esd_x", "esd_u", "uce", "ca")
#: The filters every evaluation compares: the filter library owns their names
#: (``pipeline.espresso.filter_names``, importable without torch), so they are taken from it.
FILTERS = filter_names.FILTERS
#: ``pipeline.espresso.baselines.ADAPTABLE``: the filters with a margin on CLIP embeddings, which
#: a "+" attack can adapt to.
ADAPTABLE = ("safety_checker", "mhsc", "zero_shot", "espresso")
#: ``pipeline.finetune.OPTIMIZERS``.
OPTIMIZERS = ("adamw", "adam")
#: ``pipeline.espresso.losses.SEPARATIONS``: the forms of the separation term.
SEPARATIONS = ("concepts", "prompt_pairs")
#: ``pipeline.attack.VOCABULARIES``: the words hard prompts may use.
VOCABULARIES = ("world", "all")
#: ``pipeline.statistics.CORRECTIONS``: multiplicity controls of a family of paired claims.
CORRECTIONS = ("holm", "fdr_bh")

T = TypeVar("T", bound=Mapping)


def implemented(names: tuple[str, ...], table: T, what: str) -> T:
    """``table`` if its keys are exactly ``names`` (in that order); else a ``RuntimeError``
    naming ``what`` and both lists (raised where the table is built, at import)."""
    if tuple(table) != tuple(names):
        raise RuntimeError(f"{what} implements {', '.join(table)}; pipeline.registry names "
                           f"{', '.join(names)}: make them the same")
    return table
