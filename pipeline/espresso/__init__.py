"""Espresso, the filter library: the filter, the many-concept checker, and what they need (model
loading, embeddings, pixels, atomic files); also the evaluation's parts (the baselines, the
metrics, the losses, the certificate, the text-to-image model).

It imports nothing from the DVC stages, the attacks or the mini world (``tests/test_layout.py``),
so that it can be lifted into a top-level package of its own unchanged. What is re-exported here
(``from pipeline.espresso import ConceptChecker``) needs only the core dependencies (torch,
transformers, safetensors, numpy, pillow: ``pip install .``). The evaluation's
modules are imported from their own names and need the ``pipeline`` extra:
``pipeline.espresso.baselines`` and ``.t2i`` (diffusers), ``.metrics`` (scipy, statsmodels).

The re-exports load on first use (PEP 562): ``from pipeline.espresso import EspressoFilter``
imports only ``filter`` and what it imports, not the checker, and importing a submodule such as
``pipeline.espresso.files`` imports no model library. The name -> submodule map is a plain dict
literal and there is no ``if TYPE_CHECKING:`` import block, so any import scanner
(``tests/import_graph.py`` reads the dict) sees that importing this package runs none of the
submodules, so a DVC stage's deps name only the submodules it really loads.
"""
from __future__ import annotations

import importlib

#: Each re-exported name -> the submodule that defines it.
_SOURCES = {
    "CheckResult": "checker", "CheckerConcept": "checker", "ConceptChecker": "checker",
    "cut_for_fpr": "checker",
    "image_embeddings": "embeddings", "text_embeddings": "embeddings",
    "EspressoFilter": "filter", "ImageFormError": "filter", "Screening": "filter",
    "black_image": "filter", "blocks": "filter", "canonical_image": "filter",
    "ModelNotAvailableError": "models", "load_clip": "models",
}

__all__ = ["CheckResult", "CheckerConcept", "ConceptChecker", "EspressoFilter", "ImageFormError",
           "ModelNotAvailableError", "Screening", "black_image", "blocks", "canonical_image",
           "cut_for_fpr", "image_embeddings", "load_clip", "text_embeddings"]


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
