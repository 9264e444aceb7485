"""What the edit stage's outputs are to the stages that read them: per CRT, the edited UNet and
its test images. Apart from the stage module, so that a reader depends on this contract and not
on how the edits are made."""
from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path("data/edit")
UNET = "unet"
TEST_IMAGES = "test.npz"


def load_edited_unet(crt: str, device=None, dtype=None):
    """The UNet that ``crt`` edited (diffusers folder), on the pipeline's device and dtype."""
    from diffusers import UNet2DConditionModel

    from pipeline.espresso.models import hub_loading, resolve_source

    folder = resolve_source(OUT / crt / UNET, "edited UNet folder")
    with hub_loading(folder):
        unet = UNet2DConditionModel.from_pretrained(folder)
    return unet.to(device=device, dtype=dtype).eval()


def load_edited_test_images(crt: str) -> np.ndarray:
    with np.load(OUT / crt / TEST_IMAGES) as data:
        return data["images"]
