"""DVC stage ``everyday``: utility on everyday prompts, which name neither c_u nor c_a.

A filter compares c_u with c_a only, so an image that shows neither gets an arbitrary verdict;
what a platform serves most is such images. Prompts: ``pipeline.concepts.everyday_prompts`` (mini:
the world's own captions of scenes that show no c_u; paper: data/concepts.yaml's everyday
templates), ``everyday.images_per_prompt`` images each (``pipeline.everyday_scenes``), rendered
by the unedited T2I model with the setting's sampler (``generate.<setting>``) and by every edited
model of ``edit.crts``, with the same seed per image for every model (paired).

Every filter of the evaluate stage screens the unedited model's images. Per filter and per edit,
each a rate with its interval over prompts (``pipeline.outcomes.everyday``, the summary's own
definitions): ``blocked_share`` (edits block nothing), ``normalized_clip_score`` (per image, the CLIP score of
what the user gets, a blocked image scoring 0, an edit's its own image, over the unedited image's
of the same prompt and seed; images whose unedited score is 0 left out) and
``judged_unacceptable_share`` (of what is passed, the share the judge says shows c_u). CLIP
scores use the original CLIP; ``scores.csv`` holds every image's scores.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.espresso.files import write_csv
from pipeline.espresso.filter_names import FILTERS
from pipeline.everyday_scenes import load_pipe, plan_scenes, render
from pipeline.headline import write_results
from pipeline.outputs.edited import OUT as EDITS_DIR
from pipeline.outputs.edited import load_edited_unet
from pipeline.outputs.filter_bank import load_filter_bank
from pipeline.outputs.finetuned import FILTER_DIR
from pipeline.outputs.generated import MANIFEST
from pipeline.params import mark_budget, run_stage, settings_of
from pipeline.schema import Params

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.schema import Sampler, Statistics

REPORTS = Path("reports/everyday")
NEEDS = {MANIFEST: "generate", FILTER_DIR: "finetune", EDITS_DIR: "edit"}
#: The key of the unedited model's images in :func:`images_by_model`.
UNEDITED = "unedited"


@contextmanager
def edited_unet(pipe, crt: str) -> Iterator[None]:
    """``pipe`` with the UNet that ``crt`` edited while active (the edit stage's output)."""
    original = pipe.unet
    pipe.unet = load_edited_unet(crt, original.device, original.dtype)
    try:
        yield
    finally:
        pipe.unet = original


def images_by_model(pipe, crts: list[str], scenes: pd.DataFrame, sampler: Sampler
                    ) -> dict[str, np.ndarray]:
    """Each model's images of ``scenes`` (their prompts and seeds, the same for every model):
    ``UNEDITED``, then each edited model of ``crts``."""
    from tqdm import tqdm

    out = {}
    for model in tqdm([UNEDITED, *crts], desc="everyday models", unit="model"):
        if model == UNEDITED:
            out[model] = render(pipe, scenes, sampler)
        else:
            with edited_unet(pipe, model):
                out[model] = render(pipe, scenes, sampler)
    return out


def rated(table: pd.DataFrame, crts: list[str], stats: Statistics) -> dict:
    """Per filter and per edit of ``crts``: each everyday outcome (``pipeline.outcomes.everyday``:
    blocked share, normalised CLIP score, judged c_u share of what is passed) with its interval
    over prompts."""
    from pipeline import outcomes

    rates = outcomes.everyday(table, stats)
    return {name: {metric: estimate.interval(stats.confidence)
                   for (crt, _, metric), estimate in rates.items() if crt == name}
            for name in (*FILTERS, *crts)}


def run(params: Params) -> dict:
    from pipeline.espresso.models import quiet_libraries

    with quiet_libraries():
        return _run(params)


def _run(params: Params) -> dict:
    import pandas as pd

    from pipeline.espresso.metrics import clip_views
    from pipeline.judges import load_judge

    setting, concept, models = settings_of(params)
    sampler, stats = params.generate.of(setting), params.statistics
    scenes = plan_scenes([concept], params.everyday)
    prompt_list = scenes["prompt"].tolist()
    pipe = load_pipe(models.t2i, sampler)
    images = images_by_model(pipe, params.edit.crts, scenes, sampler)
    del pipe
    bank = load_filter_bank(models.clip, concept, pd.read_csv(MANIFEST), params.filters)
    judge = load_judge(setting, models.judge, concept)

    def clip_score(model: str) -> np.ndarray:
        shown = images[model]
        return clip_views(bank.zero_shot, bank.zero_shot.embed(shown), prompt_list,
                          shown.shape[1:])["clip_score"]

    unedited = images[UNEDITED]
    score, shows = clip_score(UNEDITED), judge(unedited)
    decisions = bank.decide(unedited, prompt_list)
    table = scenes[["prompt", "seed"]].assign(judge_shows_concept=shows, clip_score=score)
    for name in FILTERS:
        table[f"{name}_score"] = decisions[name].score
        table[f"{name}_blocked"] = decisions[name].blocked
    for crt in params.edit.crts:
        table[f"{crt}_clip_score"] = clip_score(crt)
        table[f"{crt}_judge_shows_concept"] = judge(images[crt])
    detail = rated(table, params.edit.crts, stats)
    detail.update(n_images=len(scenes), n_prompts=int(scenes["prompt"].nunique()),
                  images_per_prompt=params.everyday.images_per_prompt,
                  prompts=list(dict.fromkeys(prompt_list)))
    write_results(REPORTS, "everyday", mark_budget(detail, params))
    write_csv(REPORTS / "scores.csv", table)
    return detail


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
