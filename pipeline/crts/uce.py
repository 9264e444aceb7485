"""UCE, Unified Concept Editing (Gandikota et al. 2024): a closed-form edit of the cross-attention
key and value projections W, the only UNet weights that read the text.

For edit states c_e (of c_u) with targets v*_e = W_old c*_e (c*_e: c_a's aligned states) and
preserved states c_p, W_new minimises
``lam |W - W_old|^2 + sum_e |W c_e - v*_e|^2 + s sum_p |W c_p - W_old c_p|^2``, i.e.
``W_new = W_old (lam I + sum_e c*_e c_e^T + s sum_p c_p c_p^T)(lam I + sum_e c_e c_e^T
+ s sum_p c_p c_p^T)^-1``. Every projection reads the same text states, so the right-hand factor
P is solved once (in float64) and each W becomes W_old P.

Token alignment follows UCE's release: a text's states from its last word token to the end of
the padded sequence (the states a causal text encoder has seen the whole concept in), c_u's and
c_a's aligned position by position and cut to the same count. Preserved texts keep every state
of their padded sequence, and the empty prompt is always preserved (as in UCE's release): it is
the unconditional branch of classifier-free guidance.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipeline.crts import EditTask, encode, trainable_names

if TYPE_CHECKING:  # its budget of edit.<setting> (pipeline.schema)
    from pipeline.schema import Uce


@torch.no_grad()
def aligned_states(pipe, unacceptable: str,
                   acceptable: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_e, c*_e): ``n x width`` states of ``unacceptable`` and of ``acceptable``, from each
    text's last word token on, position by position (``n``: the shorter of the two runs)."""
    mask = pipe.tokenizer([unacceptable, acceptable], padding="max_length", truncation=True,
                          max_length=pipe.tokenizer.model_max_length,
                          return_tensors="pt").attention_mask
    last = (mask.sum(dim=1) - 2).tolist()  # the end-of-text token is the last unmasked one
    count = mask.shape[1] - max(last)
    states = encode(pipe, [unacceptable, acceptable])
    return states[0, last[0]:last[0] + count], states[1, last[1]:last[1] + count]


@torch.no_grad()
def uce(task: EditTask, p: Uce) -> dict:
    """Edit every ``attn2.to_k`` / ``attn2.to_v`` weight of ``task.pipe.unet`` in place.
    ``p``: regularization (UCE's lambda, the pull towards the old weights), preserve_scale (the
    weight of the preserved states). Returns the counts and the worst relative residuals of both
    constraints. Like the other edits, it leaves the UNet frozen."""
    pipe = task.pipe
    pipe.unet.requires_grad_(False)
    edit, target = (s.double() for s in aligned_states(pipe, task.unacceptable, task.acceptable))
    texts = [""] + [text for text in task.preserve if text != ""]
    kept = encode(pipe, texts).double().flatten(0, 1)
    scale, lam = p.preserve_scale, p.regularization
    eye = lam * torch.eye(edit.shape[1], dtype=torch.float64, device=edit.device)
    inputs = eye + edit.T @ edit + scale * kept.T @ kept
    outputs = eye + target.T @ edit + scale * kept.T @ kept
    right = torch.linalg.solve(inputs, outputs.T).T  # outputs @ inputs^-1 (inputs is symmetric)
    owned = dict(pipe.unet.named_parameters())
    residual = drift = 0.0
    for name in trainable_names("uce", pipe.unet):
        weight = owned[name]
        old = weight.double()
        new = old @ right
        wanted = target @ old.T
        residual = max(residual, float((edit @ new.T - wanted).norm() / wanted.norm()))
        drift = max(drift, float(((kept @ (new - old).T).norm() / (kept @ old.T).norm())))
        weight.copy_(new.to(weight.dtype))
    return {"edited_matrices": len(trainable_names("uce", pipe.unet)),
            "edit_tokens": edit.shape[0], "preserved_texts": len(texts),
            "preserved_tokens": kept.shape[0], "edit_residual": residual,
            "preserve_drift": drift}
