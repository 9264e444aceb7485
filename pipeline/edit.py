"""DVC stage ``edit``: the prior fine-tuning CRTs (METHOD section 8), each editing the T2I model
for the current concept: ESD-x, ESD-u, UCE and CA (``pipeline.crts``; which ones: ``edit.crts``,
budgets per setting in ``edit.mini`` / ``edit.paper``).

Per CRT, ``data/edit/<crt>/`` holds the edited UNet (a diffusers ``UNet2DConditionModel``
folder, safetensors), ``test.npz``: its images of the test split's prompts with the generate
stage's seeds (what the evaluate stage scores against the unedited model's), and ``edit.json``:
what the edit did and the key of its inputs. Resumable: a CRT whose folder carries the
key of the current inputs (params, concept, models, training images, this stage's code) is kept;
an iterative edit that is interrupted continues from its last checkpoint (``<crt>.checkpoint-
<key>``, removed when the edit is published). Seeded: the same inputs give the same bytes.

Data-parallel (as ``generate``: ``accelerate launch`` or ``torchrun``): the CRTs still to edit
are split between the processes; each CRT's edit and test images run on one process from its
own seeds, so the outputs are byte-identical for 1 and N processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.concepts import known_concepts, get_concept, prompt_pairs
from pipeline.espresso.files import atomic_dir
from pipeline.headline import write_results
from pipeline.outputs.edited import OUT, TEST_IMAGES, UNET
from pipeline.outputs.generated import MANIFEST, load_images
from pipeline.params import mark_budget, processes, run_stage, settings_of
from pipeline.schema import Params

if TYPE_CHECKING:
    import pandas as pd

REPORTS = Path("reports/edit")
RECORD = "edit.json"
NEEDS = {MANIFEST: "generate"}
#: The code an edit runs, in its key: an edit made by other code is not reused.
CODE = (Path(__file__), *sorted((Path(__file__).parent / "crts").glob("*.py")))

log = logging.getLogger(__name__)


def preserved_texts(concept, setting: str) -> list[str]:
    """The other concepts' texts of the setting (both sides), and the anchor c_a: what an edit
    that preserves concepts (UCE) must leave as it was."""
    texts = [concept.acceptable]
    for name in known_concepts(setting):
        other = get_concept(name, setting)
        if name != concept.name:
            texts += [other.unacceptable, other.acceptable]
    return [t for t in dict.fromkeys(texts) if t.lower() != concept.unacceptable.lower()]


def edit_key(crt: str, params: Params, manifest: pd.DataFrame) -> str:
    """Hash of everything an edit's output depends on."""
    setting, concept, models = settings_of(params)
    spec = json.dumps([crt, params.edit.seed, params.edit.of(setting).of(crt).model_dump(),
                       concept.name, concept.unacceptable, concept.acceptable, models.t2i,
                       models.clip, params.generate.model_dump(),
                       manifest[["split", "label", "prompt", "seed",
                                 "shard_sha256"]].values.tolist()],
                      sort_keys=True, default=str)
    digest = hashlib.sha256(spec.encode())
    for path in CODE:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run(params: Params) -> dict:
    from pipeline.espresso.models import quiet_libraries

    with quiet_libraries():
        return _run(params)


def _run(params: Params) -> dict:
    import pandas as pd

    from pipeline.crts import EDITS, EditTask
    from pipeline.espresso.t2i import generate, load_t2i, use_scheduler

    setting, concept, models = settings_of(params)
    p = params.edit
    sampler = params.generate.of(setting)
    manifest = pd.read_csv(MANIFEST)
    anchors = manifest[(manifest["split"] == "train") & (manifest["label"] == "acceptable")]
    test = manifest[manifest["split"] == "test"]
    pairs = prompt_pairs(concept, params.generate.prompts.model_dump(), params.generate.seed)
    keys = {crt: edit_key(crt, params, manifest) for crt in p.crts}
    kept = [crt for crt in p.crts if (OUT / crt / RECORD).is_file()
            and json.loads((OUT / crt / RECORD).read_text()).get("key") == keys[crt]]
    for crt in kept:
        log.info("%s: kept (its inputs are unchanged)", crt)
    state = processes()
    with state.split_between_processes([c for c in p.crts if c not in kept]) as mine:
        for crt in mine:  # a CRT's edit and its images, on one process: seeded by its own seed
            key, folder = keys[crt], OUT / crt
            pipe = load_t2i(models.t2i)
            use_scheduler(pipe, sampler.scheduler)
            pipe.set_progress_bar_config(disable=True)
            for stale in OUT.glob(f"{crt}.checkpoint-*"):
                if stale.name != f"{crt}.checkpoint-{key}":
                    shutil.rmtree(stale)
            checkpoint = OUT / f"{crt}.checkpoint-{key}"
            task = EditTask(pipe=pipe, unacceptable=concept.unacceptable,
                            acceptable=concept.acceptable, pairs=pairs["train"],
                            anchor_images=load_images(anchors),
                            anchor_pairs=anchors["pair"].tolist(),
                            preserve=preserved_texts(concept, setting), seed=p.seed,
                            size=sampler.size, steps=sampler.steps, checkpoint=checkpoint)
            start = time.perf_counter()
            summary = EDITS[crt](task, p.of(setting).of(crt))
            seconds = time.perf_counter() - start
            images = generate(pipe, test["prompt"].tolist(), test["seed"].tolist(),
                              sampler.steps, sampler.guidance, sampler.size, sampler.batch,
                              progress=state.is_local_main_process)
            summary.pop("resumed_from", None)  # how it got there is no part of the result
            record = {"crt": crt, "key": key, "concept": concept.name, **summary}
            with atomic_dir(folder) as tmp:
                pipe.unet.save_pretrained(tmp / UNET)
                with open(tmp / TEST_IMAGES, "wb") as f:
                    np.savez(f, images=images)
                (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            shutil.rmtree(checkpoint, ignore_errors=True)
            log.warning("%s: edited in %.0f s", crt, seconds)  # a time is logged, never written
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    done = {crt: json.loads((OUT / crt / RECORD).read_text()) for crt in p.crts}
    for stale in set(OUT.iterdir()) - {OUT / crt for crt in p.crts}:
        if not stale.name.startswith(tuple(f"{crt}.checkpoint-" for crt in p.crts)):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    write_results(REPORTS, "edit", mark_budget(
        {crt: {k: v for k, v in info.items() if k != "key"} for crt, info in done.items()}, params))
    return done


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
