"""CLIP byte-pair-encoding tokenizer (bundled vocabulary from `instant-clip-tokenizer`)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

SOT_TOKEN = 49406
EOT_TOKEN = 49407


@lru_cache(maxsize=1)
def _tokenizer():
    import instant_clip_tokenizer

    return instant_clip_tokenizer.Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """Tokenise texts into OpenAI-CLIP token ids (identical to OpenAI's ``SimpleTokenizer``).

    Args:
        texts: One text or a sequence of texts (non-strings are converted with ``str``).
        context_length: Number of token slots per text (77 for every OpenAI CLIP model).
        truncate: Too-long texts are cut to ``context_length`` keeping ``<end_of_text>`` in the
            last slot; with ``False`` they raise instead.

    Returns:
        An int64 tensor ``[N, context_length]``: ``<start_of_text>``, the BPE ids, ``<end_of_text>``,
        then zero padding. An empty string gives ``[<sot>, <eot>, 0, ...]``; an empty list gives
        ``[0, context_length]``.

    Raises:
        ValueError: ``truncate=False`` and a text needs more than ``context_length`` tokens.
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
    """Decode token ids back to text.

    Args:
        ids: Token ids, e.g. a row of `tokenize`'s output.

    Returns:
        The text; ``<start_of_text>``, ``<end_of_text>`` and padding (0) are dropped.
    """
    ids = [int(i) for i in ids if int(i) not in (0, SOT_TOKEN, EOT_TOKEN)]
    return _tokenizer().decode(ids)


def token_strings(ids: Sequence[int]) -> list[str]:
    """Decode each token id on its own, for per-token explanations.

    Args:
        ids: Token ids.

    Returns:
        One string per id: ``"<sot>"``, ``"<eot>"``, ``""`` for padding, else the token's text.
    """
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
