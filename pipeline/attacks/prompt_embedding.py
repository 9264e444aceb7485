"""Text encoding with optimisable token embeddings, through public APIs only.

Attacks optimise prompts in token-embedding space (PEZ's soft prompts, CCE's new token). A
forward hook on the text model's input-embedding layer (``get_input_embeddings()``, a public
transformers API) replaces the embedding of every placeholder token by a given vector, so the
unmodified ``CLIPTextModel`` / ``CLIPModel`` forward computes everything else (positions, causal
mask, EOS pooling, projection) and gradients reach the vectors.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from pipeline.espresso.embeddings import text_features


@contextmanager
def placeholder_embeddings(text_model, token_id: int, values: torch.Tensor) -> Iterator[None]:
    """While active, each occurrence of ``token_id`` embeds as the next row of ``values``
    (``B x k x d``, in row-major order of the occurrences), or as ``values`` itself if 1-d."""
    def hook(module, inputs, output):
        mask = inputs[0] == token_id
        if not mask.any():
            return output
        rows = (values.expand(int(mask.sum()), -1) if values.dim() == 1
                else values.reshape(-1, values.shape[-1]))
        out = output.clone()
        out[mask] = rows.to(out.dtype)
        return out

    handle = text_model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def textual_inversion(pipe, vectors: dict[str, torch.Tensor]) -> Iterator[None]:
    """The new tokens of ``vectors`` (token -> embedding) loaded into the T2I ``pipe`` with
    diffusers' textual-inversion API while active. They are added to a copy of the pipe's
    tokenizer that is swapped out again afterwards: diffusers' unload rebuilds a tokenizer's
    backend, which loses the CLIPTokenizer's decoding of ``</w>`` (decoded prompts would read
    ``zorbo</w>a</w>``). The embedding table stays as frozen as it was: loading resizes it into a
    fresh parameter that would otherwise collect gradients of every later search."""
    original = pipe.tokenizer
    frozen = not pipe.text_encoder.get_input_embeddings().weight.requires_grad
    pipe.tokenizer = copy.deepcopy(original)
    loaded = []
    try:
        for token, vector in vectors.items():
            pipe.load_textual_inversion({token: vector}, token=token)
            loaded.append(token)
        if frozen:
            pipe.text_encoder.get_input_embeddings().requires_grad_(False)
        yield
    finally:
        if loaded:
            pipe.unload_textual_inversion(loaded)
            pipe.text_encoder.get_input_embeddings().requires_grad_(not frozen)
        pipe.tokenizer = original


class TokenPrompts:
    """Prompts made of ``k`` free tokens, ``[BOS, tok_1..tok_k, EOS, pad...]``, encoded by a
    CLIP text side with each token's embedding given explicitly (so that it can carry a
    gradient). ``vocabulary`` holds the ids a hard prompt may use (no special tokens): every
    token, or only those of ``words`` (a model's known language)."""

    def __init__(self, text_model, tokenizer, words: tuple[str, ...] | None = None):
        self.text_model, self.tokenizer = text_model, tokenizer
        special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        self.placeholder = next(i for i in range(len(tokenizer)) if i not in special)
        n = text_model.get_input_embeddings().num_embeddings
        allowed = range(min(n, len(tokenizer))) if words is None else sorted(
            {i for w in words for i in tokenizer(w, add_special_tokens=False).input_ids})
        self.vocabulary = torch.tensor([i for i in allowed if i not in special])

    @property
    def table(self) -> torch.Tensor:
        """The token embedding table (``vocab x d``) of this text side."""
        return self.text_model.get_input_embeddings().weight

    def input_ids(self, batch: int, k: int) -> torch.Tensor:
        length = self.tokenizer.model_max_length
        if k + 2 > length:
            raise ValueError(f"{k} prompt tokens do not fit a context of {length} "
                             f"(at most {length - 2}); lower the attack's `tokens` param")
        ids = torch.full((batch, length), self.tokenizer.pad_token_id)
        ids[:, 0], ids[:, 1:k + 1], ids[:, k + 1] = (self.tokenizer.bos_token_id,
                                                     self.placeholder, self.tokenizer.eos_token_id)
        return ids.to(self.table.device)

    def project(self, soft: torch.Tensor) -> torch.Tensor:
        """PEZ's projection: the vocabulary id nearest (cosine) to each soft embedding."""
        table = F.normalize(self.table[self.vocabulary].float(), dim=-1)
        nearest = (F.normalize(soft.float(), dim=-1) @ table.T).argmax(-1)
        return self.vocabulary.to(nearest.device)[nearest]

    def embed(self, ids: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
        """This side's embeddings of hard ``ids``; with ``soft``, a straight-through estimate:
        the value is the hard embedding, the gradient flows to ``soft`` (PEZ), never to the
        table."""
        hard = self.table.detach()[ids]
        return hard if soft is None else hard + (soft - soft.detach())

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Hard prompts as text (what a user would type), cut to what the text encoder reads:
        decoded text can re-tokenise longer than the ids it came from."""
        texts = [self.tokenizer.decode(row.tolist()).strip() for row in ids]
        kept = self.tokenizer(texts, truncation=True,
                              max_length=self.tokenizer.model_max_length).input_ids
        return [self.tokenizer.decode(k, skip_special_tokens=True).strip() for k in kept]


def clip_text_features(clip, prompts: TokenPrompts, values: torch.Tensor) -> torch.Tensor:
    """Unit-norm CLIP text features (phi_p) of token prompts given their embeddings ``values``;
    ``prompts`` must wrap ``clip.text_model``."""
    ids = prompts.input_ids(*values.shape[:2])
    with placeholder_embeddings(prompts.text_model, prompts.placeholder, values):
        return text_features(clip, ids)
