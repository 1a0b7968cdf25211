"""What the web app needs from an index, on top of `calibclip.index.Index`.

`ServedIndex` wraps one opened index: search, sampling, id -> image lookup (paths come only
from the index's own metadata), suggested modifications, and CalibCLIP explanations.
The index and its encoder are shared read-only by every request; model inference is
serialised by a lock (one CPU-bound forward at a time is also the fastest on CPU).
"""

from __future__ import annotations

import io
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from calibclip.data.images import ImageError, load_image
from calibclip.web.captions import Annotation, Suggestions, read_annotations

THUMB_SIDE = 256
FULL_SIDE = 2048
#: Image explanations kept in memory (oldest dropped first).
EXPLAIN_CACHE = 512
#: Largest opacity (0-255) of a heatmap cell; scaled by the cell's attention.
HEATMAP_ALPHA = 170


class ImageNotFound(LookupError):
    """An id that does not name an image of the index (or whose file disappeared)."""


class ServedIndex:
    """One index as the web app serves it."""

    def __init__(self, name: str, index: Any, suggestions: Suggestions | None = None):
        self.name = name
        self.index = index
        self.suggestions = suggestions
        self.lock = threading.Lock()
        self._calibrator: Any = None
        self._explained: dict[tuple[int | Path, int], dict[str, Any]] = {}
        self._image_cache = lru_cache(maxsize=512)(self._encode_image_file)

    @classmethod
    def open(
        cls, name: str, directory: str | Path, model: str | None = None, captions: str | Path | None = None,
        device: str = "cpu",
    ) -> "ServedIndex":
        """Open ``directory`` (built by ``calibclip index``), load its model, and read the
        annotations (``captions`` file, else the ones recorded with the index), if any."""
        from calibclip.index import Index

        index = Index.open(directory, model=model, device=device)
        _ = index.encoder  # load (and fingerprint-check) the model now, not on the first request
        annotations = read_annotations(captions) if captions else _recorded_annotations(index)
        suggestions = Suggestions(annotations, _all_paths(index)) if annotations else None
        return cls(name, index, suggestions)

    # ---- metadata ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def can_calibrate(self) -> bool:
        return bool(getattr(self.index, "has_calibrated", False))

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": len(self.index),
            "model": str(getattr(self.index, "model_name", "unknown")),
            "combining": "combiner" if getattr(self.index, "combiner", None) is not None else "sum",
            "calibration": self.can_calibrate,
            "suggestions": bool(self.suggestions and len(self.suggestions)),
        }

    def has(self, image_id: int) -> bool:
        return self._lookup(image_id) is not None

    def _lookup(self, image_id: int) -> Any:
        """The index's record of ``image_id`` (path recorded at build time), or None."""
        if image_id not in self.index:
            return None
        try:
            return self.index.get_image(image_id)
        except KeyError:
            return None

    def rel_path(self, image_id: int) -> str:
        rec = self._lookup(image_id)
        return "" if rec is None else str(rec.relpath)

    # ---- queries -----------------------------------------------------------------------------
    def search(self, text: str | None, image: int | Path | None, k: int, calibrate: bool) -> list[Any]:
        with self.lock:
            return list(self.index.search(text=text, image=image, k=k, calibrate=calibrate))

    def sample(self, n: int, seed: int | None, annotated: bool = False) -> list[int]:
        if annotated and self.suggestions is not None and len(self.suggestions):
            refs = np.asarray(self.suggestions.references())
            rng = np.random.default_rng(seed)
            return [int(i) for i in rng.choice(refs, size=min(n, len(refs)), replace=False)]
        return [int(i) for i in self.index.sample(n, seed=seed)]

    def suggestions_for(self, image_id: int) -> list[tuple[str, int | None]]:
        return self.suggestions.for_reference(image_id) if self.suggestions is not None else []

    def annotated_target(self, image_id: int, text: str) -> int | None:
        return self.suggestions.target(image_id, text) if self.suggestions is not None else None

    # ---- images ------------------------------------------------------------------------------
    def _encode_image_file(self, path: Path, mtime: float, thumb: bool) -> bytes:
        img = load_image(path)
        side = THUMB_SIDE if thumb else FULL_SIDE
        img.thumbnail((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85 if thumb else 92)
        return buf.getvalue()

    def image_file(self, source: int | Path) -> Path:
        """File of an indexed id (from the index's metadata) or of an upload (already resolved)."""
        if isinstance(source, Path):
            return source
        rec = self._lookup(source)
        if rec is None:
            raise ImageNotFound(f"image {source} is not in index {self.name!r}")
        return Path(rec.path)

    # ---- explanations ------------------------------------------------------------------------
    def calibrator(self) -> Any:
        """The index's own `Calibrator` (its recorded settings), or a default one for an index
        built without calibrated vectors (explanations only)."""
        if self.can_calibrate:
            return self.index.calibrator()
        if self._calibrator is None:
            from calibclip.calibration.methods import create_calibrator

            self._calibrator = create_calibrator(self.index.encoder)  # the encoder's packaged defaults
        return self._calibrator

    def explain_text(self, text: str) -> list[dict[str, Any]]:
        """The query's words (special tokens left out) with the pooling token's attention, and
        whether CalibCLIP found each dominant / masked it."""
        with self.lock:
            exp = self.calibrator().explain_text([text])[0]
        return [
            {"token": str(t), "weight": float(a), "dominant": bool(d), "masked": bool(m)}
            for t, a, d, m, sp in zip(exp.tokens, exp.attention, exp.dominant, exp.masked, exp.special)
            if not sp
        ]

    def explain_images(self, sources: Sequence[int | Path]) -> list[dict[str, Any]]:
        """Token grid, per-cell attention and per-cell CalibCLIP treatment of each image (the
        latest explanations are cached, so the heatmap PNGs that follow cost no forward pass)."""
        import torch

        try:
            keys = [(s, self.image_file(s).stat().st_mtime_ns) for s in sources]
        except OSError as exc:
            raise ImageNotFound("an image to explain is no longer readable (deleted or expired upload)") from exc
        encoder = self.index.encoder
        with self.lock, torch.inference_mode():
            todo = [k for k in dict.fromkeys(keys) if k not in self._explained]
            if todo:
                try:
                    pixels = torch.stack([encoder.preprocess(load_image(self.image_file(s))) for s, _ in todo])
                except ImageError as exc:
                    raise ImageNotFound(f"an image to explain cannot be decoded any more ({exc.reason})") from exc
                exps = self.calibrator().explain_image(pixels.to(encoder.device, encoder.dtype))
                for key, exp in zip(todo, exps):
                    self._explained[key] = {
                        "grid": [int(exp.grid[0]), int(exp.grid[1])],
                        "attention": [round(float(a), 6) for a in np.asarray(exp.attention, np.float64).reshape(-1)],
                        "treatment": [str(t) for t in np.asarray(exp.treatment).reshape(-1)],
                    }
            out = [self._explained[k] for k in keys]
            while len(self._explained) > EXPLAIN_CACHE:
                self._explained.pop(next(iter(self._explained)))
        return out

    def heatmap_png(self, source: int | Path) -> bytes:
        """The image with each token cell tinted by its CalibCLIP treatment (suppress red, decay
        orange, retain green, target blue, context clear), opacity growing with its attention."""
        from calibclip.calibration.explain import TREATMENT_COLOURS

        exp = self.explain_images([source])[0]
        try:
            img = load_image(self.image_file(source))
        except ImageError as exc:
            raise ImageNotFound(f"the image cannot be decoded any more ({exc.reason})") from exc
        img.thumbnail((512, 512), Image.Resampling.BICUBIC)
        h, w = exp["grid"]
        att = np.asarray(exp["attention"], dtype=np.float64).reshape(h, w)
        att = att / att.max() if att.max() > 0 else att
        labels = np.asarray(exp["treatment"]).reshape(h, w)
        cells = np.zeros((h, w, 4), dtype=np.uint8)
        for name, colour in TREATMENT_COLOURS.items():
            rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
            where = labels == name
            cells[where, :3] = rgb
            cells[where, 3] = (HEATMAP_ALPHA * (0.35 + 0.65 * att[where])).astype(np.uint8)
        overlay = Image.fromarray(cells, "RGBA").resize(img.size, Image.Resampling.NEAREST)
        out = Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")
        buf = io.BytesIO()
        out.save(buf, format="PNG", optimize=False)
        return buf.getvalue()


def image_bytes(ix: ServedIndex, source: int | Path, thumb: bool) -> bytes:
    """JPEG bytes of an image (re-encoded through the project's decoder; thumbnails cached)."""
    path = ix.image_file(source)
    try:
        mtime = path.stat().st_mtime
        return ix._image_cache(path, mtime, thumb)
    except (OSError, ImageError) as exc:
        raise ImageNotFound(f"image file for {source if isinstance(source, int) else 'upload'} is no longer readable") from exc


def _all_paths(index: Any) -> dict[int, str]:
    """Indexed id -> path relative to the indexed folder, used to match annotation names to ids."""
    root = Path(index.images_dir)
    out = {}
    for i, p in index.paths():
        try:
            out[int(i)] = Path(p).relative_to(root).as_posix()
        except ValueError:
            out[int(i)] = Path(p).name
    return out


def _recorded_annotations(index: Any) -> list[Annotation]:
    """Annotations of the dataset the index was built from, found by the CIRR / CSS (``calibclip
    make-css``) / FashionIQ layout: ``captions/cap.*.json`` in the indexed folder or its parent."""
    root = Path(index.images_dir)
    files = sorted({p for d in (root, root.parent) for p in (d / "captions").glob("cap.*.json")})
    return [a for f in files for a in read_annotations(f)]
