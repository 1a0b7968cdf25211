"""Small shared helpers: progress bars, devices and precision."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from tqdm.auto import tqdm

PRECISIONS = ("fp32", "bf16", "fp16")


def progress_bar(total: int | None = None, desc: str = "", disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr with rate and ETA; silenced with ``CALIBCLIP_NO_PROGRESS=1``."""
    disable = disable or os.environ.get("CALIBCLIP_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, disable=disable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 everywhere; bf16 on CPU or CUDA; fp16 on CUDA only (CPU fp16 matmuls are slow/inexact)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
