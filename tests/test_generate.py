"""The generate stage: a manifest of aligned images, stored in shards, resumable."""
import numpy as np
import pandas as pd
import pytest

from pipeline import generate
from pipeline.espresso import t2i
from pipeline.outputs.generated import load_images
from pipeline.params import check_params


def test_plan_has_every_split_and_label_with_unique_seeds(tiny_params):
    from pipeline.concepts import get_concept

    plan = generate.plan_images(get_concept("zorbo", "mini"), check_params(tiny_params).generate)
    counts = plan.groupby(["split", "label"]).size().to_dict()
    assert counts == {(s, label): n for s, n in (("train", 4), ("val", 4), ("test", 4))
                      for label in generate.LABELS}
    assert plan["seed"].is_unique


@pytest.mark.slow
def test_interrupted_generation_resumes_without_redoing_finished_shards(
        stage_dir, tiny_params, monkeypatch):
    real_generate, calls = t2i.generate, []

    def flaky(pipe, prompts, *args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt  # the user stops the run after one shard
        calls.append(len(prompts))
        return real_generate(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(t2i, "generate", flaky)
    params = check_params(tiny_params)
    with pytest.raises(KeyboardInterrupt):
        generate.run(params)
    finished = sorted(p.name for p in (stage_dir / "data/generate").glob("*.npz"))
    assert len(finished) == 1 and not (stage_dir / "data/generate/manifest.csv").exists()
    assert not list((stage_dir / "data/generate").glob(".*"))  # no half-written shard

    calls.clear()
    monkeypatch.setattr(t2i, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    manifest = generate.run(params)
    assert len(calls) == len(manifest["shard"].unique()) - 1  # the finished shard was kept
    resumed = load_images(manifest)

    for shard in (stage_dir / "data/generate").glob("*.npz"):
        shard.unlink()
    fresh = load_images(generate.run(params))
    assert np.array_equal(resumed, fresh)  # resuming gives exactly the images of a clean run
    assert pd.read_csv(stage_dir / "data/generate/manifest.csv").shape[0] == len(fresh)
