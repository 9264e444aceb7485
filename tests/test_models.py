"""Model loading, offline, with tiny random models in the paper setting's formats.

The tiny models (``tiny_hub``, fixtures in ``conftest``) are put into a fake Hugging Face cache,
laid out like the real one, so that the paper's real hub ids load through the same cache path the
paper setting uses offline.
"""
import shutil

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline
from tiny_hub import CLIP_ID, IMAGE_SIZE, SD_ID

from pipeline.espresso.models import ModelNotAvailableError, load_clip, pick_device, resolve_source
from pipeline.espresso.t2i import load_t2i
from pipeline.mini.sd import SHARED_WITH_CLIP

CPU = dict(device="cpu", dtype=torch.float32)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == (torch.device("cuda"), torch.float16)


def test_clip_from_hub_cache(offline_hub, clip):
    model, tokenizer, processor = load_clip(CLIP_ID)  # default placement: CPU, fp32 here
    assert not model.training and model.dtype == torch.float32
    assert_same_weights(model, clip)  # the weights came from the fake cache
    images = [np.zeros((48, 40, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    tokens = tokenizer(["a photo of a cat", "a dog"], padding="max_length", max_length=77,
                       return_tensors="pt")
    assert tokens.input_ids[0, 0] == 49406
    with torch.no_grad():
        image_emb = model.get_image_features(pixel_values=pixels).pooler_output
        text_emb = model.get_text_features(**tokens).pooler_output
    assert image_emb.shape == text_emb.shape == (2, 16)
    assert torch.isfinite(image_emb).all() and torch.isfinite(text_emb).all()


def test_t2i_from_hub_cache_generates(offline_hub, clip):
    pipe = load_t2i(SD_ID, **CPU)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert_same_weights(pipe.text_encoder, clip.text_model)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red star", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(images).all()


@pytest.mark.slow
def test_t2i_mini_layout_links_text_encoder_to_clip(folders, clip):
    """The mini layout's text encoder is the CLIP's text tower, stored once (links), and the
    folder loads with the project's loader and with diffusers alone."""
    assert all((folders / "sd_mini" / name).is_symlink() for name in SHARED_WITH_CLIP)
    for pipe in (load_t2i(str(folders / "sd_mini"), **CPU),
                 StableDiffusionPipeline.from_pretrained(folders / "sd_mini")):
        assert_same_weights(pipe.text_encoder, clip.text_model)
        assert len(pipe.tokenizer) == 49408


@pytest.mark.parametrize("load", [load_clip, load_t2i])
def test_hub_id_not_cached_offline(offline_empty_hub, load):
    with pytest.raises(ModelNotAvailableError) as info:
        load("someorg/not-cached-model", **CPU)
    message = str(info.value)
    assert "'someorg/not-cached-model' is not in the local Hugging Face cache" in message
    assert "offline" in message and "hf download someorg/not-cached-model" in message


@pytest.mark.parametrize("load", [load_clip, load_t2i])
def test_missing_local_folder(tmp_path, load):
    with pytest.raises(ModelNotAvailableError, match="does not exist") as info:
        load(str(tmp_path / "world" / "clip"), **CPU)
    assert "git checkout -- data/world" in str(info.value)
    assert "dvc repro world" in str(info.value)


def test_missing_tokenizer_files_are_an_error(folders, tmp_path):
    """transformers would otherwise hand back an empty tokenizer."""
    shutil.copytree(folders / "clip", tmp_path / "clip",
                    ignore=shutil.ignore_patterns("vocab.json", "merges.txt", "tokenizer*"))
    with pytest.raises(ModelNotAvailableError, match="tokenizer files"):
        load_clip(str(tmp_path / "clip"), **CPU)


@pytest.mark.parametrize("source, hub", [
    ("openai/clip-vit-large-patch14", True),
    ("data/world/clip", False),  # deeper than org/name
    ("./clip/model", False),
    ("/no/such/clip", False),
    ("models/clip", False),      # "models" is a local folder: a local path, not a hub org
])
def test_resolve_source(monkeypatch, tmp_path, source, hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    if hub:
        assert resolve_source(source) == source
    else:
        with pytest.raises(ModelNotAvailableError, match="does not exist"):
            resolve_source(source)
