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


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """The parsed YAML of ``path`` (``yaml.safe_load``: no object construction).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not UTF-8 or not valid YAML; the message names the file and the line.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{what} {path} is not valid YAML{where}: {problem}") from None
