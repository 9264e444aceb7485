"""Pixels, one implementation of each conversion, so that every image the filter, the attacks and
the mini world score is normalised the same way: value ranges (uint8, [0, 1], [-1, 1]) and
CLIP's pixel normalisation (the processor's path, and its torch twin for gradients and batches).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: The value ranges of float images: diffusers' ``output_type="np"``/``"pt"`` and the VAE's.
VALUE_RANGES = ("0,1", "-1,1")


def channels_first(images: torch.Tensor, value_range: str) -> torch.Tensor:
    """uint8 ``N x H x W x 3`` -> float ``N x 3 x H x W`` in ``value_range`` ([-1, 1]: the VAE's
    input)."""
    x = images.permute(0, 3, 1, 2).float()
    return x / 255 if value_range == "0,1" else x / 127.5 - 1


def unit_range(x):
    """[-1, 1] -> [0, 1], clamped as diffusers' ``denormalize`` (VAE decodes overshoot a little);
    an array or a tensor, in its own dtype."""
    return (x * 0.5 + 0.5).clip(0, 1)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """A float array in [0, 1] -> uint8, rounded as diffusers' ``numpy_to_pil`` rounds."""
    return (x * 255).round().astype(np.uint8)


def clip_pixels(processor, images: list[np.ndarray]) -> torch.Tensor:
    """The canonical path: CLIP's processor (resize, centre crop, rescale, normalise) on uint8
    ``H x W x 3`` images, exactly what a diffusers pipeline's feature extractor computes."""
    return processor(images=images, return_tensors="pt",
                     input_data_format="channels_last").pixel_values


def clip_pixels_torch(processor, images: torch.Tensor) -> torch.Tensor:
    """The processor's resize, centre crop and normalisation in torch, for float
    ``N x 3 x H x W`` images in [0, 1]: gradients reach the images (attacks), and a batch needs
    no per-image PIL round trip (the mini CLIP's training). At the model's resolution the resize
    and crop are exact identities."""
    size, crop = processor.size["shortest_edge"], processor.crop_size
    scale = size / min(images.shape[-2:])
    height, width = round(images.shape[-2] * scale), round(images.shape[-1] * scale)
    x = F.interpolate(images, size=(height, width), mode="bicubic", antialias=True,
                      align_corners=False)
    top, left = (height - crop["height"]) // 2, (width - crop["width"]) // 2
    x = x[..., top:top + crop["height"], left:left + crop["width"]]
    mean = torch.tensor(processor.image_mean, device=x.device)[:, None, None]
    std = torch.tensor(processor.image_std, device=x.device)[:, None, None]
    return (x - mean) / std
