"""CLIP byte-pair-encoding tokenizer (bundled vocabulary from `instant-clip-tokenizer`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

SOT_TOKEN = 49406
EOT_TOKEN = 49407


@lru_cache(maxsize=1)
def _tokenizer():
    import instant_clip_tokenizer

    return instant_clip_tokenizer.Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = True) -> torch.LongTensor:
    """OpenAI-compatible: texts -> ``LongTensor[N, context_length]`` zero-padded.

    Too-long texts are truncated keeping ``<end_of_text>`` in the last slot (``truncate=False``
    raises instead). Empty strings give ``[<sot>, <eot>]``.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = [str(t) for t in texts]
    if not truncate:
        for t in texts:
            n = len(_tokenizer().encode(t)) + 2
            if n > context_length:
                raise ValueError(f"input {t[:40]!r}... is {n} tokens, too long for context length {context_length}")
    if not texts:
        return torch.zeros(0, context_length, dtype=torch.long)
    arr = _tokenizer().tokenize_batch(texts, context_length=context_length)
    return torch.from_numpy(np.asarray(arr, dtype=np.int64))


def decode(ids: Sequence[int]) -> str:
    """Token ids -> text (special and padding tokens dropped)."""
    ids = [int(i) for i in ids if int(i) not in (0, SOT_TOKEN, EOT_TOKEN)]
    return _tokenizer().decode(ids)


def token_strings(ids: Sequence[int]) -> list[str]:
    """Each id as its own (decoded) string, for explanations."""
    out = []
    for i in ids:
        i = int(i)
        if i == SOT_TOKEN:
            out.append("<sot>")
        elif i == EOT_TOKEN:
            out.append("<eot>")
        elif i == 0:
            out.append("")
        else:
            out.append(_tokenizer().decode([i]).strip())
    return out
