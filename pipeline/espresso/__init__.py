"""Espresso, the filter library: the filter, the many-concept checker, and what they need (model
loading, embeddings, pixels, atomic files); also the evaluation's parts (the baselines, the
metrics, the losses, the certificate, the text-to-image model).

It imports nothing from the DVC stages, the attacks or the mini world (``tests/test_layout.py``),
so that it can be lifted into a top-level package of its own unchanged. What is re-exported here
(``from pipeline.espresso import ConceptChecker``) needs only the core dependencies (torch,
transformers, safetensors, numpy, pillow: ``pip install .``). The evaluation's
modules are imported from their own names and need the ``pipeline`` extra:
``pipeline.espresso.baselines`` and ``.t2i`` (diffusers), ``.metrics`` (scipy, statsmodels).
"""
from pipeline.espresso.checker import CheckerConcept, CheckResult, ConceptChecker, cut_for_fpr
from pipeline.espresso.embeddings import image_embeddings, text_embeddings
from pipeline.espresso.filter import (EspressoFilter, ImageFormError, Screening, black_image,
                                      blocks, canonical_image)
from pipeline.espresso.models import ModelNotAvailableError, load_clip

__all__ = ["CheckResult", "CheckerConcept", "ConceptChecker", "EspressoFilter", "ImageFormError",
           "ModelNotAvailableError", "Screening", "black_image", "blocks", "canonical_image",
           "cut_for_fpr", "image_embeddings", "load_clip", "text_embeddings"]
