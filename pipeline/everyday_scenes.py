"""The everyday test condition's images, shared by the ``everyday`` stage and ``pipeline.export``:
prompts that name none of the concepts under test (``pipeline.concepts.everyday_prompts``), each
rendered ``everyday.images_per_prompt`` times by a T2I pipeline with the setting's sampler.

Image ``j`` of prompt ``i`` has the seed :func:`scene_seed` ``(everyday.seed, i, j)``: a function
of those three numbers alone, so every model renders a prompt with the same seeds (paired
images), and more prompts or images per prompt keep the seeds of the ones already there."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.concepts import Concept, everyday_prompts

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.schema import Everyday, Sampler


def scene_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The generator seed of image ``image_index`` of prompt ``prompt_index`` (32 bits, from
    numpy's ``SeedSequence`` of the three numbers)."""
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1)[0])


def plan_scenes(concepts: list[Concept], everyday: Everyday) -> pd.DataFrame:
    """One row per image: ``prompt``, ``prompt_index``, ``image``, ``seed``; ``everyday.prompts``
    prompts naming none of ``concepts``, ``everyday.images_per_prompt`` images each."""
    prompts = everyday_prompts(concepts, everyday.prompts, everyday.seed)
    return scene_rows(prompts, everyday.seed, everyday.images_per_prompt)


def scene_rows(prompts: list[str], seed: int, images_per_prompt: int,
               first_index: int = 0) -> pd.DataFrame:
    """The rows of ``prompts``, prompt ``i`` at index ``first_index + i`` of its draw (its
    seeds are those of that index: a longer draw's prompts keep theirs)."""
    import pandas as pd

    return pd.DataFrame([dict(prompt=prompt, prompt_index=i, image=j,
                              seed=scene_seed(seed, i, j))
                         for i, prompt in enumerate(prompts, start=first_index)
                         for j in range(images_per_prompt)])


def load_pipe(source: str, sampler: Sampler):
    """The T2I pipeline of ``source`` with the sampler's scheduler, its own progress bar off."""
    from pipeline.espresso.t2i import load_t2i, use_scheduler

    pipe = load_t2i(source)
    use_scheduler(pipe, sampler.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, scenes: pd.DataFrame, sampler: Sampler, progress: bool = True) -> np.ndarray:
    """uint8 ``N x H x W x 3``: each row's image of its prompt and seed."""
    from pipeline.espresso.t2i import generate

    return generate(pipe, scenes["prompt"].tolist(), scenes["seed"].tolist(), sampler.steps,
                    sampler.guidance, sampler.size, sampler.batch, progress=progress)
