"""Model loading, offline, with tiny random models in the paper setting's formats.

The tiny models (``tiny_hub``, fixtures in ``conftest``) are put into a fake Hugging Face cache,
laid out like the real one, so that the paper's real hub ids load through the same cache path the
paper setting uses offline.
"""
import importlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline
from tiny_hub import CLIP_ID, IMAGE_SIZE, SD_ID

from pipeline.espresso import ConceptChecker, EspressoFilter
from pipeline.espresso.models import (ModelNotAvailableError, load_clip, local_reason,
                                      pick_device, resolve_source)
from pipeline.espresso.t2i import load_t2i
from pipeline.mini.judge import Judge
from pipeline.mini.sd import SHARED_WITH_CLIP
from pipeline.outputs.edited import load_edited_unet

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


#: Every loader that takes a folder or a hub id, and what its one-line error calls the folder.
REPO = Path(__file__).resolve().parents[1]
LOADERS = {
    "load_clip": (lambda source: load_clip(source, **CPU), "model folder"),
    "load_t2i": (lambda source: load_t2i(source, **CPU), "model folder"),
    "ConceptChecker.from_pretrained": (ConceptChecker.from_pretrained, "checker folder"),
    "ConceptChecker.from_clip": (lambda source: ConceptChecker.from_clip(
        source, {"zorbo": ("Zorbo", "a star")}, device="cpu"), "model folder"),
    "EspressoFilter.from_pretrained": (EspressoFilter.from_pretrained, "filter folder"),
    "EspressoFilter.from_clip": (lambda source: EspressoFilter.from_clip(
        source, "Zorbo", "a star", device="cpu"), "model folder"),
    "Judge.load": (Judge.load, "model folder"),
}
#: The loaders that read hub ids (a saved Espresso filter is a local folder only).
HUB_LOADERS = [name for name in LOADERS if name != "EspressoFilter.from_pretrained"]


@pytest.mark.parametrize("load", HUB_LOADERS)
def test_hub_id_not_cached_offline(offline_empty_hub, load):
    """A bare owner/name is tried as a hub id: offline and not cached, its one-line message."""
    with pytest.raises(ModelNotAvailableError) as info:
        LOADERS[load][0]("someorg/not-cached-model")
    message = str(info.value)
    assert "'someorg/not-cached-model' is not in the local Hugging Face cache" in message
    assert "offline" in message and "hf download someorg/not-cached-model" in message
    assert "\n" not in message


def test_missing_tokenizer_files_are_an_error(folders, tmp_path):
    """transformers would otherwise hand back an empty tokenizer."""
    shutil.copytree(folders / "clip", tmp_path / "clip",
                    ignore=shutil.ignore_patterns("vocab.json", "merges.txt", "tokenizer*"))
    with pytest.raises(ModelNotAvailableError, match="tokenizer files"):
        load_clip(str(tmp_path / "clip"), **CPU)


@pytest.mark.parametrize("source, reason", [
    ("openai/clip-vit-large-patch14", None),
    ("data/nochecker", "'data' exists here"),
    ("models/clip", "'models' exists here"),
    ("./clip", "it starts with './'"),
    ("../clip", "it starts with '../'"),
    ("~/clip", "it starts with '~'"),
    (".clip/x", "it starts with '.'"),
    ("/no/such/clip", "it starts with '/'"),
    ("data/world/clip", "it has more than one '/'"),
    ("org\\clip", "it has a backslash"),
    ("clip", "it is not of the form owner/name"),
    ("C:/clip", "it is not of the form owner/name"),
])
def test_only_a_bare_owner_name_is_a_hub_id(monkeypatch, tmp_path, source, reason):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "models").mkdir()
    assert local_reason(source) == reason
    if reason is None:
        assert resolve_source(source) == source
    else:
        with pytest.raises(ModelNotAvailableError, match="does not exist"):
            resolve_source(source)


def test_an_existing_path_is_local_whatever_it_looks_like(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someorg" / "model").mkdir(parents=True)
    assert resolve_source("someorg/model") == "someorg/model"
    assert resolve_source(tmp_path / "someorg") == str(tmp_path / "someorg")


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize("source, reason", [
    ("data/nochecker", "'data' exists here"),  # a mistyped folder beside existing ones
    ("./nothing", "it starts with './'"),
    ("nothing/at/all", "it has more than one '/'"),
])
def test_a_missing_local_path_fails_at_once_in_one_line(monkeypatch, tmp_path, load, source,
                                                        reason):
    """Online settings (no HF_HUB_OFFLINE): a hub lookup would retry for tens of seconds."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    call, what = LOADERS[load]
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as info:
        call(source)
    assert time.perf_counter() - start < 2
    assert str(info.value).startswith(
        f"{what} {source!r} does not exist; it is a local path ({reason}), so it was not tried "
        "as a hub id: check the path, or ")
    assert "\n" not in str(info.value)


def test_a_missing_checker_folder_says_how_to_build_one(tmp_path):
    with pytest.raises(ModelNotAvailableError) as info:
        ConceptChecker.from_pretrained(tmp_path / "nochecker")
    assert str(info.value) == (
        f"checker folder {str(tmp_path / 'nochecker')!r} does not exist; it is a local path (it "
        "starts with '/'), so it was not tried as a hub id: check the path, or build one with "
        "`python -m pipeline.export`, or give a hub id (owner/name)")


def test_a_missing_edited_unet_says_to_rerun_the_edit(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as info:
        load_edited_unet("uce")
    assert time.perf_counter() - start < 2
    assert str(info.value) == (
        "edited UNet folder 'data/edit/uce/unet' does not exist; it is a local path (it has "
        "more than one '/'), so it was not tried as a hub id: check the path, or rebuild it "
        "with `dvc repro edit`")


@pytest.mark.parametrize("load", [load_clip, load_t2i])
def test_missing_world_folder_says_to_restore_it(tmp_path, load):
    folder = tmp_path / "data" / "world" / "clip"
    with pytest.raises(ModelNotAvailableError) as info:
        load(str(folder), **CPU)
    assert str(info.value) == (
        f"model folder {str(folder)!r} does not exist; it is a local path (it starts with '/'), "
        "so it was not tried as a hub id: check the path, or restore it with `git checkout -- "
        "data/world` (the mini world's models are committed in git)")


@pytest.mark.parametrize("load", list(LOADERS))
@pytest.mark.parametrize("source, problem", [
    ("a" * 5000, "cannot be a path here (File name too long)"),
    ("data/x\0y", "cannot be a path here (embedded null byte)"),
    ("params.yaml", "is a file, not a folder"),
])
def test_a_path_no_folder_can_have_is_one_line(monkeypatch, load, source, problem):
    """A name the system cannot have, or a file where a folder is expected: one line (the long
    name cut short), not the OS's traceback or a library's guess at a missing file."""
    monkeypatch.chdir(REPO)
    call, what = LOADERS[load]
    with pytest.raises(ModelNotAvailableError) as info:
        call(source)
    message = str(info.value)
    assert message.startswith(f"{what} ") and problem in message
    assert "\n" not in message and len(message) < 400


@pytest.mark.parametrize("module, option", [
    ("screen", ["data/checker", "x.png", "--out"]), ("export", ["--calibrate-on"]),
    ("export", ["--out"]), ("summary", ["--out"]), ("headline", ["--reports"]),
    ("provenance", ["--verify", "zorbo", "--out"])])
@pytest.mark.parametrize("name", ["a" * 5000, "x\0y"])
def test_a_command_line_path_no_file_can_have_is_argparses_one_line(capsys, module, option,
                                                                    name):
    main = importlib.import_module(f"pipeline.{module}").main
    with pytest.raises(SystemExit) as info:
        main([*option, name])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot be a path here (" in err and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) < 400


def test_a_checkpoint_with_saved_buffers_still_loads(tmp_path):
    """Older checkpoints (openai's CLIP on the hub) also hold the position_ids buffers, which the
    loader recomputes: the fit check must not refuse them, nor a weight the model lacks pass."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(REPO / "data" / "world" / "clip", tmp_path / "clip")
    weights = load_file(tmp_path / "clip" / "model.safetensors")
    weights["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    weights["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(weights, tmp_path / "clip" / "model.safetensors")
    assert load_clip(str(tmp_path / "clip"), **CPU)[0] is not None
    weights["text_model.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "clip" / "model.safetensors")
    with pytest.raises(ModelNotAvailableError, match="text_model.extra.weight, which the model "
                                                     "has no place for"):
        load_clip(str(tmp_path / "clip"), **CPU)
