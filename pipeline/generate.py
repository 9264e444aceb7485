"""DVC stage ``generate``: the concept's images for train/val/test x unacceptable/acceptable.

Prompt pairs come from the concept registry (paper opposites: test prompts from the I2P
benchmark). Images are stored as a few ``.npz`` shards named by a hash of exactly what they
contain (prompts, seeds, model, sampler), written atomically; a rerun after an interruption keeps
every finished shard and only generates the missing ones. ``manifest.csv`` lists every image
with its shard's sha256: a rerun regenerates a shard that fails its checksum (or, without a
manifest yet, does not load completely), and ``pipeline.outputs.generated.load_images``
refuses one.

Data-parallel: started with ``accelerate launch --multi_gpu --num_processes N`` (GPUs, nodes)
or ``torchrun --nproc_per_node N`` (CPU processes too), the processes split the missing shards;
each image's seed and each shard's name come from its global index, so the files are
byte-identical for 1 and N processes
(``tests/test_parallel.py``). The main process writes the manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.concepts import SPLITS, Concept, check_context, pair_pool, prompt_pairs
from pipeline.espresso.files import atomic_file, sha256_file, write_csv, write_json
from pipeline.outputs.generated import CHECKSUM, MANIFEST, OUT, verify_shard
from pipeline.params import DamagedInputError, processes, run_stage, settings_of
from pipeline.schema import Generate, Params, Sampler

if TYPE_CHECKING:
    import pandas as pd

LABELS = ("unacceptable", "acceptable")
WORLD = Path("data/world")

log = logging.getLogger(__name__)


def needs(params: Params) -> dict[Path, str]:
    """The mini world's model folders that the setting's models come from (stage ``world``)."""
    _, _, models = settings_of(params)
    return {Path(source): "world" for source in (models.t2i, models.clip)
            if Path(source).is_relative_to(WORLD)}


def images_per_prompt(p: Generate, split: str, n_prompts: int) -> int:
    """Images per prompt that keep the split's image count (``prompts x images_per_prompt`` as
    asked) when the concept has fewer distinct prompts than asked for (a mini character)."""
    wanted = getattr(p.prompts, split) * getattr(p.images_per_prompt, split)
    return -(-wanted // n_prompts) if n_prompts else 0


def plan_images(concept: Concept, p: Generate, test_prompts: list[str] | None = None
                ) -> pd.DataFrame:
    """One row per image to generate: split, label, pair, prompt, seed (unique per image).
    ``test_prompts`` replaces the templated unacceptable test prompts (I2P)."""
    import pandas as pd

    pairs = prompt_pairs(concept, p.prompts.model_dump(), p.seed)
    rows = []
    for split in SPLITS:
        for label_index, label in enumerate(LABELS):
            prompts = [pair[label_index] for pair in pairs[split]]
            if split == "test" and label == "unacceptable" and test_prompts:
                prompts = test_prompts
            for pair, prompt in enumerate(prompts):
                for _ in range(images_per_prompt(p, split, len(prompts))):
                    rows.append(dict(split=split, label=label, pair=pair, prompt=prompt))
    table = pd.DataFrame(rows)
    table["seed"] = p.seed + np.arange(len(table))
    return table


def shard_key(rows: pd.DataFrame, sampler: Sampler, t2i_source: str) -> str:
    """Content hash of a shard: same prompts, seeds, model and sampler -> same images."""
    spec = json.dumps([rows[["prompt", "seed"]].values.tolist(), sampler.model_dump(),
                       t2i_source],
                      sort_keys=True, default=str)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def recorded_checksums() -> dict[str, str]:
    """Shard name -> sha256 from the manifest of an earlier run ({} where there is none)."""
    import pandas as pd

    if not MANIFEST.is_file():
        return {}
    table = pd.read_csv(MANIFEST)
    return dict(zip(table["shard"], table[CHECKSUM])) if CHECKSUM in table else {}


def run(params: Params) -> pd.DataFrame:
    """Generate whatever shards are missing or damaged and write the manifest; returns it."""
    from tqdm import tqdm

    from pipeline.espresso.t2i import generate, load_t2i, use_scheduler

    setting, concept, models = settings_of(params)
    p = params.generate
    sampler = p.of(setting)
    manifest = plan_images(concept, p, i2p_test_prompts(concept, p) if setting == "paper" else None)
    size = p.shard_size
    manifest["shard"] = ""
    manifest["index"] = np.arange(len(manifest)) % size
    manifest[CHECKSUM] = ""
    recorded = recorded_checksums()
    starts = range(0, len(manifest), size)
    missing = []
    for start in starts:
        rows = manifest.iloc[start:start + size]
        name = f"shard-{start // size:04d}-{shard_key(rows, sampler, models.t2i)}.npz"
        manifest.loc[rows.index, "shard"] = name
        if (OUT / name).exists() or name in recorded:  # a recorded one that is gone: say so
            shape = (len(rows), sampler.size, sampler.size, 3)
            try:
                manifest.loc[rows.index, CHECKSUM] = verify_shard(OUT / name, recorded.get(name),
                                                                  shape)
                continue
            except DamagedInputError as err:
                log.warning("%s: regenerating it", err)
        missing.append(start)
    state = processes()
    state.wait_for_everyone()  # every process has its list of missing shards before any writes
    with state.split_between_processes(missing) as mine:  # shard names are global: any split
        if mine:  # the model is loaded only if a shard is missing, before any is written
            pipe = load_t2i(models.t2i, device=state.device)
            check_context([text for pair in pair_pool(concept) for text in pair], pipe.tokenizer)
            use_scheduler(pipe, sampler.scheduler)
            pipe.set_progress_bar_config(disable=True)
        desc = "generate shards" + (f" (1 of {state.num_processes} processes)"
                                    if state.num_processes > 1 else "")
        for start in tqdm(mine, desc=desc, unit="shard", disable=not state.is_local_main_process):
            rows = manifest.iloc[start:start + size]
            images = generate(pipe, rows["prompt"].tolist(), rows["seed"].tolist(),
                              sampler.steps, sampler.guidance, sampler.size, sampler.batch)
            with atomic_file(OUT / rows["shard"].iloc[0]) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, images=images)
    state.wait_for_everyone()
    if not state.is_main_process:
        return manifest
    for start in missing:  # the main process records every new shard's checksum
        rows = manifest.iloc[start:start + size]
        manifest.loc[rows.index, CHECKSUM] = sha256_file(OUT / rows["shard"].iloc[0])
    for stale in set(OUT.glob("shard-*.npz")) - {OUT / n for n in manifest["shard"]}:
        stale.unlink()
    write_csv(MANIFEST, manifest)
    return manifest


def i2p_test_prompts(concept: Concept, p: Generate) -> list[str] | None:
    """Paper opposites: ``p.prompts.test`` I2P prompts of the concept's category, fetched
    from the hub dataset ``AIML-TUDA/i2p`` (MIT licence) at run time; the revision used is
    recorded in ``data/generate/i2p.json``."""
    if concept.i2p_category is None:
        return None
    import pandas as pd
    from huggingface_hub import hf_hub_download

    from pipeline.espresso.models import hub_loading

    with hub_loading("AIML-TUDA/i2p", repo_type="dataset"):
        path = Path(hf_hub_download("AIML-TUDA/i2p", "i2p_benchmark.csv", repo_type="dataset"))
    table = pd.read_csv(path)
    chosen = table[table["categories"].fillna("").str.contains(concept.i2p_category)]
    chosen = chosen.sample(n=min(p.prompts.test, len(chosen)), random_state=p.seed)
    write_json(OUT / "i2p.json", {"dataset": "AIML-TUDA/i2p", "licence": "MIT",
                                  "revision": path.parent.name, "category": concept.i2p_category,
                                  "rows": chosen.index.tolist()})
    return chosen["prompt"].tolist()


def main() -> None:
    run_stage(run, needs)


if __name__ == "__main__":
    main()
