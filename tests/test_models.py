"""Model loading, offline, with tiny random models in the paper setting's formats.

The tiny models are put into a fake Hugging Face cache, laid out like the real one, so that the
paper's real hub ids load through the same cache path the paper setting uses offline.
"""
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from pipeline.models import (ModelNotAvailableError, load_clip, load_t2i, pick_device,
                             resolve_source)
from pipeline.tokenizer import build_clip_tokenizer

CLIP_ID, SD_ID = "openai/clip-vit-large-patch14", "CompVis/stable-diffusion-v1-4"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WIDTH, IMAGE_SIZE = 32, 32
CPU = dict(device="cpu", dtype=torch.float32)

torch.set_num_threads(1)


def tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    tower = dict(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=2 * WIDTH)
    return CLIPModel(CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(tower, image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=16)).eval()


def tiny_sd(clip: CLIPModel, tokenizer) -> StableDiffusionPipeline:
    """SD v1.4's classes and scheduler; its text encoder is the CLIP's text tower, as in SD."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=8)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=clip.text_model, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="session")
def clip():
    return tiny_clip()


@pytest.fixture(scope="session")
def folders(tmp_path_factory, clip):
    """Local folders: the CLIP, and SD in the mini world's layout (no text encoder/tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_clip_tokenizer(context_length=77)
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(root / "clip")
    tiny_sd(clip, tokenizer).save_pretrained(root / "sd_full")
    shutil.copytree(root / "sd_full", root / "sd_mini",
                    ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    return root


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory, folders):
    """A Hugging Face cache holding the tiny models under the paper's hub ids."""
    home = tmp_path_factory.mktemp("hf_home")
    for repo_id, folder in ((CLIP_ID, "clip"), (SD_ID, "sd_full")):
        repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folders / folder, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    return home


def go_offline(monkeypatch, home) -> None:
    """Offline, with ``home`` as HF_HOME; huggingface_hub reads these at import, so its
    constants (read at call time by transformers and diffusers) are patched too."""
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def offline_hub(monkeypatch, hf_home):
    go_offline(monkeypatch, hf_home)


@pytest.fixture
def offline_empty_hub(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path / "hf_home")


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


def test_t2i_mini_layout_takes_text_encoder_from_clip(folders, clip):
    pipe = load_t2i(str(folders / "sd_mini"), clip_source=str(folders / "clip"), **CPU)
    assert_same_weights(pipe.text_encoder, clip.text_model)
    assert len(pipe.tokenizer) == 49408


def test_t2i_mini_layout_needs_clip_source(folders):
    with pytest.raises(ValueError, match="no text_encoder/ folder.*clip_source"):
        load_t2i(str(folders / "sd_mini"), **CPU)


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
