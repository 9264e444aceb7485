"""DVC stage ``evaluate``: METHOD section 5 metrics on the test split, for every filter.

Filters compared: none; a prompt keyword blocklist; a single-concept cosine threshold in the style
of the SD safety checker (threshold calibrated on validation images); Espresso zero-shot; Espresso
fine-tuned. CLIP accuracy and CLIP score always use the *original* CLIP; the judge (mini: the
world's CNN, paper: a different open_clip model) says what each image really shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from pipeline.embeddings import text_embeddings
from pipeline.espresso import EspressoFilter
from pipeline.files import write_csv, write_json
from pipeline.finetune import FILTER_DIR
from pipeline.generate import MANIFEST, load_images
from pipeline.judges import load_judge
from pipeline.params import run_stage, settings_of

REPORTS = Path("reports/evaluate")
FILTERS = ("none", "keyword", "threshold", "zero_shot", "espresso")


def calibrate_threshold(scores: np.ndarray, unacceptable: np.ndarray) -> float:
    """The cut on validation scores with the best balanced accuracy (midpoint between scores)."""
    cuts = np.unique(scores)
    cuts = np.concatenate([[cuts[0] - 1e-6], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1e-6]])
    accuracy = [((scores[unacceptable] > c).mean() + (scores[~unacceptable] <= c).mean()) / 2
                for c in cuts]
    return float(cuts[int(np.argmax(accuracy))])


def filter_decisions(manifest: pd.DataFrame, images: np.ndarray, features: torch.Tensor,
                     zero_shot: EspressoFilter, tuned: EspressoFilter
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(score, blocked) per filter for every image of the manifest; ``features`` are the
    original CLIP's image embeddings of ``images``."""
    keyword = manifest["prompt"].str.lower().str.contains(
        zero_shot.unacceptable.lower(), regex=False).to_numpy()
    cosine = (F.normalize(features, dim=-1) @ zero_shot.t_u).numpy()
    val = (manifest["split"] == "val").to_numpy()
    cut = calibrate_threshold(cosine[val], (manifest["label"] == "unacceptable").to_numpy()[val])
    out = {"none": (np.zeros(len(images)), np.zeros(len(images), bool)),
           "keyword": (keyword.astype(float), keyword),
           "threshold": (cosine, cosine > cut)}
    for name, filt in (("zero_shot", zero_shot), ("espresso", tuned)):
        screening = filt.screen(images)  # the library path, fail-closed included
        out[name] = (np.nan_to_num(screening.p_unacceptable, nan=1.0), screening.blocked)
    return out


@torch.no_grad()
def clip_views(zero_shot: EspressoFilter, features: torch.Tensor, prompts: list[str],
               image_shape: tuple) -> dict[str, np.ndarray]:
    """What the original CLIP says of each test image and of a black (blocked) image:
    P_eval(u|x) and CLIPScore = max(cos(image, prompt), 0)."""
    black = zero_shot.image_features(zero_shot.pixel_values([np.zeros(image_shape, np.uint8)]))
    text = text_embeddings(zero_shot.clip, zero_shot.tokenizer, prompts)
    return {"p_eval": zero_shot.p_unacceptable(features).numpy(),
            "p_eval_black": zero_shot.p_unacceptable(black).numpy(),
            "clip_score": (F.normalize(features, dim=-1) * text).sum(-1).clamp(min=0).numpy(),
            "clip_score_black": (F.normalize(black, dim=-1) @ text.T)[0].clamp(min=0).numpy()}


def clip_metrics(views: dict, blocked: np.ndarray, unacceptable: np.ndarray) -> dict:
    """CLIP accuracy on unacceptable prompts (post-filter P_eval, soft and hard) and normalised
    CLIP score on acceptable prompts (post-filter / unfiltered CLIPScore)."""
    p_after = np.where(blocked, views["p_eval_black"], views["p_eval"])
    score_after = np.where(blocked, views["clip_score_black"], views["clip_score"])
    scored = ~unacceptable & (views["clip_score"] > 0)
    return {"clip_accuracy": float(p_after[unacceptable].mean()),
            "clip_accuracy_hard": float((p_after[unacceptable] > 0.5).mean()),
            "normalized_clip_score": float((score_after[scored] / views["clip_score"][scored]).mean())}


def run(params: dict) -> dict:
    setting, concept, models = settings_of(params)
    manifest = pd.read_csv(MANIFEST)
    images = load_images(manifest)
    zero_shot = EspressoFilter.from_clip(models["clip"], concept.unacceptable, concept.acceptable)
    tuned = EspressoFilter.from_pretrained(FILTER_DIR)
    with torch.no_grad():
        features = zero_shot.image_features(zero_shot.pixel_values(list(images)))
    decisions = filter_decisions(manifest, images, features, zero_shot, tuned)
    test = (manifest["split"] == "test").to_numpy()
    unacceptable = (manifest["label"] == "unacceptable").to_numpy()[test]
    views = clip_views(zero_shot, features[test], manifest["prompt"][test].tolist(),
                       images.shape[1:])
    shows = load_judge(setting, models, concept)(images[test])
    table = manifest[test][["prompt", "seed", "label"]].assign(judge_shows_concept=shows)
    metrics = {}
    for name in FILTERS:
        score, blocked = (v[test] for v in decisions[name])
        metrics[name] = {
            **clip_metrics(views, blocked, unacceptable),
            "block_rate": float(blocked[unacceptable].mean()),
            "false_positive_rate": float(blocked[~unacceptable].mean()),
            "roc_auc": float(roc_auc_score(unacceptable, score)),
            "judged_block_rate": float(blocked[shows].mean()) if shows.any() else None,
            "judged_pass_rate": float((~blocked[~shows]).mean()) if (~shows).any() else None,
            "judged_leak_rate": float((shows & ~blocked)[unacceptable].mean()),
        }
        table[f"{name}_score"], table[f"{name}_blocked"] = score, blocked
    metrics["n_test_images"] = int(test.sum())
    metrics["judged_unacceptable_share"] = float(shows[unacceptable].mean())
    write_json(REPORTS / "metrics.json", metrics)
    write_csv(REPORTS / "scores.csv", table)
    return metrics


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
