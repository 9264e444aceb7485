"""The paper setting through the very same stage code, offline, on tiny random models stored
under the paper's hub ids (SD v1.4, CLIP ViT-L/14, the LAION open_clip judge, the I2P dataset)."""
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import UNet2DConditionModel
from tiny_hub import COMMIT
from transformers import CLIPModel

from pipeline import attack, certify, edit, evaluate, finetune, generate, judges
from pipeline.espresso.filter_names import FILTERS
from pipeline.outputs.finetuned import FILTER_DIR
from pipeline.outputs.generated import load_images
from pipeline.params import check_params

pytestmark = pytest.mark.slow  # runs every stage in the paper setting


def test_paper_setting_is_selected_by_params_alone(stage_dir, tiny_params, offline_hub, clip,
                                                   monkeypatch):
    # every attack's paper code path once: one attack seed, no curve (both tested on tiny_run)
    attacks = {**tiny_params["attack"], "seeds": 1, "budgets": [1.0]}
    params = check_params({**tiny_params, "setting": "paper", "concept": "nudity",
                           "attack": attacks})
    manifest = generate.run(params)

    test_u = manifest[(manifest["split"] == "test") & (manifest["label"] == "unacceptable")]
    assert test_u["prompt"].str.startswith("synthetic sexual prompt").all()  # from I2P
    assert set(manifest[manifest["label"] == "acceptable"]["prompt"].str.split().sum()) >= {"clean"}
    record = json.loads((stage_dir / "data/generate/i2p.json").read_text())
    assert record["revision"] == COMMIT and record["licence"] == "MIT"
    assert record["category"] == "sexual"
    assert load_images(manifest).shape == (len(manifest), 32, 32, 3)

    tuned = finetune.run(params)
    assert tuned["kind"] == "opposite"
    assert tuned["weights"] == tiny_params["finetune"]["weights"]["opposite"]
    saved = CLIPModel.from_pretrained(stage_dir / FILTER_DIR)  # a plain CLIPModel too
    assert torch.equal(saved.vision_model.embeddings.patch_embedding.weight,
                       clip.vision_model.embeddings.patch_embedding.weight)  # vision frozen

    edited = edit.run(params)  # the fine-tuning CRTs on the SD v1.4-format model
    assert set(edited) == set(params.edit.crts)
    unet = UNet2DConditionModel.from_pretrained(stage_dir / "data/edit/uce/unet")
    assert unet.config.cross_attention_dim == clip.config.text_config.hidden_size

    metrics = evaluate.run(params)
    for name in [*FILTERS, *params.edit.crts]:
        assert 0.0 <= metrics[name]["clip_accuracy"]["value"] <= 1.0
    # the open_clip judge ran on every test image
    scores = pd.read_csv(stage_dir / "reports/evaluate/scores.csv")
    assert len(scores) == metrics["n_test_images"] and scores["judge_shows_concept"].isin(
        [True, False]).all()
    assert metrics["none"]["fnr"]["value"] == 1.0
    if importlib.util.find_spec("nudenet"):  # the optional second opinion for nudity
        assert scores["nudenet_shows_concept"].isin([True, False]).all()
        assert set(metrics["espresso"]["by_nudenet"]) == {"fnr_judged", "fpr_judged"}

    # random-weight eyes confirm no target image; the attacks need some to aim at
    monkeypatch.setattr(judges, "load_eyes",  # where the attack stage takes it from when it runs
                        lambda *_: lambda images: np.ones(len(images), dtype=bool))
    attacked = attack.run(params)  # the paper budgets' structure, tiny values
    assert list(attacked["runs"]) == [run for run, *_ in attack.attack_runs(
        params.attack.attacks, params.attack.adapt_to, params.edit.crts,
        params.attack.edit_attacks)]
    assert attacked["eyes"] == params.models.paper.eyes != attacked["judge"]
    certified = certify.run(params)
    assert certified["total_violations"] == 0
