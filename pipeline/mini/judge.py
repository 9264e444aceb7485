"""The judge: a small supervised CNN that says what a world image shows.

It is independent of CLIP (different architecture, supervised labels, no text), so the pipeline
can report what generated and filtered images *really* show, not only CLIP's opinion of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from pipeline.espresso.pixels import channels_first
from pipeline.mini import shapes

if TYPE_CHECKING:  # the world section's models (pipeline.schema)
    from pipeline.schema import WorldJudge

HEADS = {name: len(vocab) for name, vocab in shapes.VOCAB.items()}


class Judge(nn.Module, PyTorchModelHubMixin):
    """Conv net with one classification head per world attribute (see ``shapes.VOCAB``)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), heads: dict | None = None):
        super().__init__()
        self.heads_spec = dict(heads or HEADS)
        layers, channels = [], 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(channels, n) for k, n in self.heads_spec.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 ``N x H x W x 3`` images -> logits per head."""
        features = self.features(channels_first(images, "-1,1"))
        return {k: head(features) for k, head in self.heads.items()}

    @classmethod
    def load(cls, folder: str) -> "Judge":
        """The judge saved in ``folder``, fp32, eval mode; a missing or damaged file is a
        ``ModelNotAvailableError`` naming it and how to restore it."""
        from pipeline.espresso.models import hub_loading, resolve_source

        source = resolve_source(str(folder))
        with hub_loading(source):
            return cls.from_pretrained(source).float().eval()

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch: int = 512) -> dict[str, np.ndarray]:
        """Predicted label index per head for uint8 ``N x H x W x 3`` images."""
        self.eval()
        parts = [self(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
                 for i in range(0, len(images), batch)]
        return {k: torch.cat([p[k] for p in parts]).argmax(1).numpy() for k in self.heads}


def _augment() -> v2.Compose:
    """Flips and mild blur: generated images are softer than renders and may be mirrored."""
    return v2.Compose([v2.RandomHorizontalFlip(),
                       v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 0.8))], p=0.5)])


def train_judge(p: WorldJudge, images: np.ndarray, scenes: list[shapes.Scene], seed: int,
                character_share: float = 0.25, device: str = "cpu") -> Judge:
    """Supervised training of every head (colour is ignored on characters, label -1);
    ``p.widths`` sets the architecture (the attacker's eyes are a narrower judge)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    judge = Judge(widths=tuple(p.widths)).to(device)
    labels = torch.from_numpy(shapes.label_matrix(scenes))
    pixels, weights = torch.from_numpy(images), shapes.sampling_weights(scenes, character_share)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=p.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, p.lr, total_steps=p.steps)
    augment = _augment()
    judge.train()
    for _ in (bar := tqdm(range(p.steps), desc="judge", mininterval=10)):
        idx = torch.from_numpy(rng.choice(len(scenes), p.batch, replace=False, p=weights))
        batch = augment(pixels[idx].to(device).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        logits = judge(batch)
        loss = sum(F.cross_entropy(logits[k], labels[idx].to(device)[:, i], ignore_index=-1)
                   for i, k in enumerate(shapes.ATTRIBUTES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return judge.cpu().eval()
