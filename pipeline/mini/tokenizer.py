"""The real CLIP BPE tokenizer, built offline from the vocabulary that open_clip's wheel ships.

transformers' ``CLIPTokenizer`` normally comes from the hub. open_clip ships the same BPE as
``bpe_simple_vocab_16e6.txt.gz``; converting it gives a tokenizer whose ids equal open_clip's
(and OpenAI's) on ordinary text (bos 49406, eos 49407).
"""
from __future__ import annotations

import gzip

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

#: Number of BPE merges CLIP uses (49152 - 256 byte tokens - 2 special tokens).
N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary (token -> id) and merge list, read from open_clip's wheel."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(context_length: int = 77) -> CLIPTokenizer:
    """A transformers CLIP tokenizer with CLIP's real vocabulary (save it with
    ``save_pretrained``; it then loads with ``CLIPTokenizer.from_pretrained``)."""
    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)
