"""DVC stage ``finetune``: Espresso's fine-tuning of CLIP's text side (METHOD section 3).

The objective is the library's (``pipeline.espresso.losses``); here are the optimisers, the
training loop and the checkpoint choice. Only the text transformer and text projection are
trained; the vision tower is frozen, so image embeddings are computed once. The separation form,
the optimiser and the epochs are per setting: the paper setting reproduces the authors' release,
the mini world uses ours (``finetune.<setting>``). The checkpoint is chosen on the validation split
(rule and epoch recorded in the metrics), and the *whole* CLIP is saved, text projection included
(the authors' release dropped it).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import registry
from pipeline.espresso.files import write_csv
from pipeline.headline import write_results
from pipeline.outputs.finetuned import FILTER_DIR
from pipeline.outputs.generated import MANIFEST, load_images
from pipeline.params import mark_budget, run_stage, settings_of
from pipeline.schema import Params

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from pipeline.espresso import EspressoFilter

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


def adamw(clip, *, lr: float, betas: list[float], eps: float,
          weight_decay: float) -> torch.optim.Optimizer:
    """Ours: AdamW, decoupled decay on the weight matrices only. No decay on parameters with
    ndim < 2 (norms, biases: open_clip's rule) nor on the token/position embedding tables
    (open_clip decays those; we do not, since decay shrinks every token a batch never uses)."""
    import torch

    trainable = trainable_text_side(clip)
    tables = {id(m.weight) for m in clip.modules() if isinstance(m, torch.nn.Embedding)}
    decayed = [q for q in trainable if q.ndim >= 2 and id(q) not in tables]
    kept = [q for q in trainable if not (q.ndim >= 2 and id(q) not in tables)]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                              {"params": kept, "weight_decay": 0.0}],
                             lr=lr, betas=tuple(betas), eps=eps)


def adam(clip, *, lr: float, betas: list[float], eps: float,
         weight_decay: float) -> torch.optim.Optimizer:
    """The release's: Adam with coupled L2 on every trainable parameter (unused tokens shrink)."""
    import torch

    return torch.optim.Adam(trainable_text_side(clip), lr=lr, betas=tuple(betas),
                            eps=eps, weight_decay=weight_decay)


OPTIMIZERS = registry.implemented(registry.OPTIMIZERS, {"adamw": adamw, "adam": adam},
                                  "pipeline.finetune.OPTIMIZERS")


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


def validate(filt: EspressoFilter, val: dict, weights: dict, separation: str) -> dict:
    """Balanced accuracy of the filter's decisions and the loss, on validation images."""
    import torch

    from pipeline.espresso import blocks
    from pipeline.espresso.losses import SEPARATIONS, espresso_loss

    # the filter library keeps its own table (it imports nothing of the pipeline): checked here
    registry.implemented(registry.SEPARATIONS, SEPARATIONS, "pipeline.espresso.losses.SEPARATIONS")
    with torch.no_grad():
        filt.refresh_concepts()
        blocked_u = blocks(filt.margin(val["images_u"]))
        blocked_a = blocks(filt.margin(val["images_a"]))
        accuracy = (blocked_u.float().mean() + (~blocked_a).float().mean()).item() / 2
        loss = espresso_loss(filt, val, weights, separation)["total"].item()
        return {"balanced_accuracy": accuracy, "loss": loss}


def run(params: Params) -> dict:
    import pandas as pd
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from pipeline.espresso import EspressoFilter
    from pipeline.espresso.losses import espresso_loss

    setting, concept, models = settings_of(params)
    p, own = params.finetune, params.finetune.of(setting)  # shared keys, the setting's own
    epochs = own.epochs_of(concept.name)
    weights, form = p.weights.of(concept.kind).model_dump(), own.separation
    torch.manual_seed(p.seed)
    rng = np.random.default_rng(p.seed)
    filt = EspressoFilter.from_clip(models.clip, concept.unacceptable, concept.acceptable)
    manifest = pd.read_csv(MANIFEST).query("split != 'test'").reset_index(drop=True)
    images = load_images(manifest)
    embeddings = F.normalize(filt.embed(images), dim=-1)  # vision side frozen: embed once
    train, val = (aligned_split(manifest, embeddings, s) for s in ("train", "val"))
    optimizer = OPTIMIZERS[own.optimizer](filt.clip, lr=p.lr, betas=p.betas, eps=p.eps,
                                          weight_decay=p.weight_decay)
    history = [{"epoch": 0, **validate(filt, val, weights, form)}]
    best_state = text_side_state(filt.clip)
    best = history[0]
    n = len(train["prompts_u"])
    for epoch in tqdm(range(1, epochs + 1), desc="finetune", unit="epoch"):
        filt.clip.train()
        order = rng.permutation(n)
        logs = []
        for start in range(0, n, p.batch):
            idx = order[start:start + p.batch]
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
               "optimizer": own.optimizer, "epochs": epochs}
    write_results(REPORTS, "finetune", mark_budget(metrics, params))
    write_csv(REPORTS / "history.csv", pd.DataFrame(history))
    return metrics


def main() -> None:
    run_stage(run, NEEDS)


if __name__ == "__main__":
    main()
