"""DVC stage ``finetune``: Espresso's fine-tuning of CLIP's text side (METHOD section 3).

The objective is the library's (``pipeline.espresso.losses``); here are the optimisers, the
training loop and the checkpoint choice. Only the text transformer and text projection are
trained; the vision tower is frozen, so image embeddings are computed once. The separation form,
the optimiser and the epochs are per setting: the paper setting reproduces the authors' release,
the mini world uses ours (``finetune_params``). The checkpoint is chosen on the validation split
(rule and epoch recorded in the metrics), and the *whole* CLIP is saved, text projection included
(the authors' release dropped it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.espresso import EspressoFilter, blocks
from pipeline.espresso.files import write_csv, write_json
from pipeline.espresso.losses import espresso_loss
from pipeline.generate import MANIFEST, load_images
from pipeline.params import SETTINGS, mark_budget, run_stage, settings_of

OUT = Path("data/finetune")
FILTER_DIR = OUT / "filter"
REPORTS = Path("reports/finetune")
SELECTION_RULE = ("epoch (0 = zero-shot) with the highest validation balanced accuracy of the "
                  "filter; ties -> the lowest validation loss")
NEEDS = {MANIFEST: "generate"}


def trainable_text_side(clip) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the text transformer and text projection."""
    clip.requires_grad_(False)
    for part in (clip.text_model, clip.text_projection):
        part.requires_grad_(True)
    return [p for p in clip.parameters() if p.requires_grad]


def adamw(clip, p: dict) -> torch.optim.Optimizer:
    """Ours: AdamW, decoupled decay on the weight matrices only. No decay on parameters with
    ndim < 2 (norms, biases: open_clip's rule) nor on the token/position embedding tables
    (open_clip decays those; we do not, since decay shrinks every token a batch never uses)."""
    trainable = trainable_text_side(clip)
    tables = {id(m.weight) for m in clip.modules() if isinstance(m, torch.nn.Embedding)}
    decayed = [q for q in trainable if q.ndim >= 2 and id(q) not in tables]
    kept = [q for q in trainable if not (q.ndim >= 2 and id(q) not in tables)]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": p["weight_decay"]},
                              {"params": kept, "weight_decay": 0.0}],
                             lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"])


def adam(clip, p: dict) -> torch.optim.Optimizer:
    """The release's: Adam with coupled L2 on every trainable parameter (unused tokens shrink)."""
    return torch.optim.Adam(trainable_text_side(clip), lr=p["lr"], betas=tuple(p["betas"]),
                            eps=p["eps"], weight_decay=p["weight_decay"])


OPTIMIZERS = {"adamw": adamw, "adam": adam}


def finetune_params(finetune: dict, setting: str, concept: str) -> dict:
    """The shared ``finetune`` keys plus the setting's separation, optimiser and epochs (per
    concept where ``epochs_by_concept`` names it), of checked params (``pipeline.schema``)."""
    own = finetune[setting]
    shared = {k: v for k, v in finetune.items() if k not in SETTINGS}
    epochs = (own.get("epochs_by_concept") or {}).get(concept, own["epochs"])
    return {**shared, "separation": own["separation"], "optimizer": own["optimizer"],
            "epochs": epochs}


def text_side_state(clip) -> dict[str, torch.Tensor]:
    """A copy of the trained weights only (the frozen vision side never changes)."""
    return {k: v.detach().clone() for k, v in clip.state_dict().items()
            if k.startswith(("text_model.", "text_projection."))}


def aligned_split(manifest: pd.DataFrame, embeddings: torch.Tensor, split: str) -> dict:
    """The split's (unacceptable, acceptable) image/prompt pairs, matched by pair id and order."""
    rows = manifest[manifest["split"] == split]
    u = rows[rows["label"] == "unacceptable"].sort_values(["pair", "seed"])
    a = rows[rows["label"] == "acceptable"].sort_values(["pair", "seed"])
    n = min(len(u), len(a))
    u, a = u.iloc[:n], a.iloc[:n]
    return {"images_u": embeddings[u.index.to_list()], "images_a": embeddings[a.index.to_list()],
            "prompts_u": u["prompt"].tolist(), "prompts_a": a["prompt"].tolist()}


@torch.no_grad()
def validate(filt: EspressoFilter, val: dict, weights: dict, separation: str) -> dict:
    """Balanced accuracy of the filter's decisions and the loss, on validation images."""
    filt.refresh_concepts()
    blocked_u = blocks(filt.margin(val["images_u"]))
    blocked_a = blocks(filt.margin(val["images_a"]))
    accuracy = (blocked_u.float().mean() + (~blocked_a).float().mean()).item() / 2
    loss = espresso_loss(filt, val, weights, separation)["total"].item()
    return {"balanced_accuracy": accuracy, "loss": loss}


def run(params: dict) -> dict:
    setting, concept, models = settings_of(params)
    p = finetune_params(params["finetune"], setting, concept.name)
    weights, form = p["weights"][concept.kind], p["separation"]
    torch.manual_seed(p["seed"])
    rng = np.random.default_rng(p["seed"])
    filt = EspressoFilter.from_clip(models["clip"], concept.unacceptable, concept.acceptable)
    manifest = pd.read_csv(MANIFEST).query("split != 'test'").reset_index(drop=True)
    images = load_images(manifest)
    embeddings = F.normalize(filt.embed(images), dim=-1)  # vision side frozen: embed once
    train, val = (aligned_split(manifest, embeddings, s) for s in ("train", "val"))
    optimizer = OPTIMIZERS[p["optimizer"]](filt.clip, p)
    history = [{"epoch": 0, **validate(filt, val, weights, form)}]
    best_state = text_side_state(filt.clip)
    best = history[0]
    n = len(train["prompts_u"])
    for epoch in tqdm(range(1, p["epochs"] + 1), desc="finetune", unit="epoch"):
        filt.clip.train()
        order = rng.permutation(n)
        logs = []
        for start in range(0, n, p["batch"]):
            idx = order[start:start + p["batch"]]
            batch = {k: v[idx] if torch.is_tensor(v) else [v[i] for i in idx]
                     for k, v in train.items()}
            terms = espresso_loss(filt, batch, weights, form)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            logs.append({f"train_{k}": v.item() for k, v in terms.items()})
        filt.clip.eval()
        record = {"epoch": epoch, **validate(filt, val, weights, form),
                  **pd.DataFrame(logs).mean().to_dict()}  # each term's mean over the epoch
        history.append(record)
        if (record["balanced_accuracy"], -record["loss"]) > (best["balanced_accuracy"], -best["loss"]):
            best = record
            best_state = text_side_state(filt.clip)
    filt.clip.load_state_dict(best_state, strict=False)
    filt.refresh_concepts()
    filt.save_pretrained(FILTER_DIR)
    metrics = {"selection_rule": SELECTION_RULE, "chosen_epoch": best["epoch"],
               "val_balanced_accuracy": best["balanced_accuracy"],
               "val_balanced_accuracy_zero_shot": history[0]["balanced_accuracy"],
               "weights": weights, "kind": concept.kind, "separation": form,
               "optimizer": p["optimizer"], "epochs": p["epochs"]}
    write_json(REPORTS / "metrics.json", mark_budget(metrics, params))
    write_csv(REPORTS / "history.csv", pd.DataFrame(history))
    return metrics


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
