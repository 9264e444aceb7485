"""Tiny random-weight models in the paper setting's formats, and a fake Hugging Face cache that
holds them under the paper's real hub ids, so that the paper setting's code runs offline.

The classes, file layouts and cache layout are the real ones; only the sizes are tiny.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from pipeline.mini.sd import SHARED_WITH_CLIP, link_text_side
from pipeline.mini.tokenizer import build_clip_tokenizer

CLIP_ID, SD_ID = "openai/clip-vit-large-patch14", "CompVis/stable-diffusion-v1-4"
JUDGE_ID = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"  # the paper setting's open_clip judge
I2P_ID = "AIML-TUDA/i2p"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WIDTH, IMAGE_SIZE = 32, 32


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


def save_tiny_open_clip(folder: Path) -> None:
    """An open_clip model in the hub layout that ``hf-hub:`` ids load (config + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 1, "width": WIDTH,
                                "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": WIDTH,
                              "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "open_clip_model.safetensors")


def save_tiny_i2p(folder: Path) -> None:
    """An I2P-shaped table of harmless synthetic prompts (the real one is fetched at run time)."""
    folder.mkdir(parents=True)
    rows = [{"prompt": f"synthetic {category} prompt number {i}", "categories": category,
             "hard": i % 2} for category in ("sexual", "violence", "hate", "shocking")
            for i in range(6)]
    pd.DataFrame(rows).to_csv(folder / "i2p_benchmark.csv", index=False)


def save_local_models(root: Path, clip: CLIPModel) -> None:
    """``root/clip``, ``root/sd_full`` (hub layout) and ``root/sd_mini`` (mini-world layout:
    text encoder and tokenizer linked to the CLIP folder), plus the judge and I2P table."""
    tokenizer = build_clip_tokenizer(context_length=77)
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(root / "clip")
    tiny_sd(clip, tokenizer).save_pretrained(root / "sd_full")
    shutil.copytree(root / "sd_full", root / "sd_mini",
                    ignore=shutil.ignore_patterns(*SHARED_WITH_CLIP))
    link_text_side(root / "sd_mini", root / "clip")
    save_tiny_open_clip(root / "judge")
    save_tiny_i2p(root / "i2p")


def build_hf_home(home: Path, models: Path) -> Path:
    """A Hugging Face cache holding the folders of ``save_local_models`` under the paper's ids."""
    for repo_id, folder, kind in ((CLIP_ID, "clip", "models"), (SD_ID, "sd_full", "models"),
                                  (JUDGE_ID, "judge", "models"), (I2P_ID, "i2p", "datasets")):
        repo = home / "hub" / f"{kind}--{repo_id.replace('/', '--')}"
        shutil.copytree(models / folder, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    return home


def go_offline(monkeypatch, home: Path) -> None:
    """Offline, with ``home`` as HF_HOME; huggingface_hub reads these at import, so its
    constants (read at call time by transformers, diffusers and open_clip) are patched too."""
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
