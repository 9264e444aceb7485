"""Independent judges: what an image really shows, decided by a model that is not the CLIP the
filter is built on. Mini world: the supervised judge CNN and the concept's ``shows`` label.
Paper setting: zero-shot over [c_u, c_a] with a different open_clip model."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pipeline import shapes
from pipeline.concepts import Concept

Judgement = Callable[[np.ndarray], np.ndarray]


def load_judge(setting: str, models: dict, concept: Concept) -> Judgement:
    """A function from uint8 ``N x H x W x 3`` images to "shows the unacceptable concept"."""
    if setting == "mini":
        return _world_judge(models["judge"], concept)
    return _open_clip_judge(models["judge"], concept)


def _world_judge(folder: str, concept: Concept) -> Judgement:
    from pipeline.judge import Judge

    judge = Judge.from_pretrained(folder).float().eval()
    ((head, value),) = concept.shows.items()
    wanted = shapes.VOCAB[head].index(value)
    return lambda images: judge.predict(images)[head] == wanted


def _open_clip_judge(name: str, concept: Concept) -> Judgement:
    """``name`` is an open_clip model name, e.g. ``hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K``
    (weights and config from that hub repo, through the Hugging Face cache)."""
    import open_clip
    from PIL import Image

    from pipeline.models import hub_loading

    with hub_loading(name.removeprefix("hf-hub:")):
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    with torch.no_grad():
        text = model.encode_text(tokenizer([concept.unacceptable, concept.acceptable]))
        text = text / text.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def shows(images: np.ndarray) -> np.ndarray:
        pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images])
        emb = model.encode_image(pixels)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return ((emb @ text.T).argmax(-1) == 0).numpy()

    return shows
