"""The bank of filters that the evaluate and attack stages compare, built from the generate
stage's images and the finetune stage's filter: one builder, so both stages screen with the same
safety checker cut and probe weights."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.outputs.finetuned import FILTER_DIR
from pipeline.outputs.generated import load_images

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.espresso.baselines import FilterBank
    from pipeline.schema import Filters


def load_filter_bank(clip_source: str, concept, manifest: pd.DataFrame,
                     filters: Filters) -> FilterBank:
    """Zero-shot and fine-tuned Espresso, the safety checker calibrated on the validation images
    of ``manifest`` (the generate stage's) and the probe fitted on its training images."""
    from pipeline.espresso import EspressoFilter
    from pipeline.espresso.baselines import FilterBank

    zero_shot = EspressoFilter.from_clip(clip_source, concept.unacceptable, concept.acceptable)
    tuned = EspressoFilter.from_pretrained(FILTER_DIR)

    def labelled(split: str) -> tuple:
        rows = manifest[manifest["split"] == split]
        return zero_shot.embed(load_images(rows)), (rows["label"] == "unacceptable").to_numpy()

    return FilterBank.build(zero_shot, tuned, labelled("train"), labelled("val"),
                            filters.mhsc.model_dump())
