"""Espresso, the filter library: the filter, the baselines it is compared with, the metrics, the
losses, the certificate, and what they need (model loading, embeddings, pixels, atomic files).

It imports nothing from the DVC stages, the attacks or the mini world (``tests/test_layout.py``),
so that it can be lifted into a top-level package of its own unchanged. The public API is
re-exported here (``from pipeline.espresso import EspressoFilter``); the rest is in its modules.
"""
from pipeline.espresso.baselines import FILTERS, Decision, FilterBank, calibrate_threshold
from pipeline.espresso.embeddings import image_embeddings, text_embeddings
from pipeline.espresso.filter import (EspressoFilter, ImageFormError, Screening, black_image,
                                      blocks, canonical_image)
from pipeline.espresso.models import ModelNotAvailableError, generate, load_clip, load_t2i

__all__ = ["FILTERS", "Decision", "EspressoFilter", "FilterBank", "ImageFormError",
           "ModelNotAvailableError", "Screening", "black_image", "blocks", "calibrate_threshold",
           "canonical_image", "generate", "image_embeddings", "load_clip", "load_t2i",
           "text_embeddings"]
