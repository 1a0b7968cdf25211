"""What the web app needs from an index, on top of `calibclip.index.Index`.

`ServedIndex` wraps one opened index: search, sampling, id -> image lookup (paths come only
from the index's own metadata), suggested modifications, and CalibCLIP explanations.
The index and its encoder are shared read-only by every request; model inference is
serialised by a lock (one CPU-bound forward at a time is also the fastest on CPU), and the text
encoder forwards of concurrent searches are micro-batched (`calibclip.web.batching`).

A running server follows re-indexing: at most every ``refresh_s`` seconds a request checks the
index's committed version (one small metadata read) and, when another process committed
(``calibclip index`` again), re-opens it with the already loaded model.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from calibclip.data.images import ImageError, load_image
from calibclip.index import ImageRecord, Index, SearchResult
from calibclip.web.batching import BatchSettings, MicroBatcher
from calibclip.web.captions import Annotation, Suggestions, read_annotations

log = logging.getLogger("calibclip.web")

THUMB_SIDE = 256
FULL_SIDE = 2048
#: Encoded query texts kept by the micro-batcher (least recently used dropped first).
TEXT_CACHE = 4096
#: Image explanations kept in memory (oldest dropped first).
EXPLAIN_CACHE = 512
#: Largest opacity (0-255) of a heatmap cell; scaled by the cell's attention.
HEATMAP_ALPHA = 170


class ImageNotFound(LookupError):
    """An id that does not name an image of the index (or whose file disappeared)."""


class ServedIndex:
    """One index as the web app serves it.

    Args:
        name: URL-safe name of the index.
        index: the opened index.
        suggestions: annotated modifications (composed search), if any.
        annotations: the annotations ``suggestions`` was made from (re-matched to ids on re-open).
        batching: micro-batching of text queries (None: no batching, every query encoded alone).
        refresh_s: how often (at most) a request checks whether the index changed on disk
            (0: every request; None: never).
    """

    def __init__(
        self,
        name: str,
        index: Index,
        suggestions: Suggestions | None = None,
        annotations: Sequence[Annotation] | None = None,
        batching: BatchSettings | None = None,
        refresh_s: float | None = 1.0,
    ):
        self.name = name
        self.index = index
        self.suggestions = suggestions
        self.annotations = list(annotations or [])
        self.lock = threading.Lock()
        self.refresh_s = refresh_s
        self._checked = time.monotonic()
        self._reopen_lock = threading.Lock()
        self._reopen_failed = False
        self._calibrator: Any = None
        self._explained: dict[tuple[int | Path, int], dict[str, Any]] = {}
        self._matches: OrderedDict[tuple[str, int, tuple[int, int]], Any] = OrderedDict()
        self._image_cache = lru_cache(maxsize=512)(self._encode_image_file)
        self._text_cache: OrderedDict[tuple[str, bool], dict[str, torch.Tensor]] = OrderedDict()
        self.batcher: MicroBatcher[tuple[str, bool], dict[str, torch.Tensor]] | None = None
        if batching is not None and batching.max_batch > 1:
            self.batcher = MicroBatcher(self._encode_texts, batching, name=f"batcher-{name}")

    @classmethod
    def open(
        cls,
        name: str,
        directory: str | Path,
        model: str | None = None,
        captions: str | Path | None = None,
        device: str = "cpu",
        batching: BatchSettings | None = None,
        refresh_s: float | None = 1.0,
    ) -> ServedIndex:
        """Open ``directory`` (built by ``calibclip index``), load its model, and read the
        annotations (``captions`` file, else the ones recorded with the index), if any."""
        index = Index.open(directory, model=model, device=device)
        _ = index.encoder  # load (and fingerprint-check) the model now, not on the first request
        annotations = read_annotations(captions) if captions else _recorded_annotations(index)
        suggestions = Suggestions(annotations, _all_paths(index)) if annotations else None
        return cls(name, index, suggestions, annotations, batching=batching, refresh_s=refresh_s)

    def close(self) -> None:
        """Stop the micro-batching worker."""
        if self.batcher is not None:
            self.batcher.close()

    # ---- freshness -----------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> bool:
        """Re-open the index if another process committed to it since it was opened (checked at most
        every ``refresh_s`` seconds unless ``force``). Returns whether it was re-opened."""
        if self.refresh_s is None and not force:
            return False
        now = time.monotonic()
        if not force and now - self._checked < (self.refresh_s or 0.0):
            return False
        with self._reopen_lock:
            self._checked = now
            old = self.index
            if not old.is_stale():
                return False
            try:
                new = Index.open(old.location, model=old.encoder)
            except Exception as exc:  # noqa: BLE001 - keep serving the version we have
                (log.debug if self._reopen_failed else log.warning)(
                    "index %s changed on disk but cannot be re-opened (%s); serving the previous version",
                    old.directory,
                    exc,
                )
                self._reopen_failed = True
                return False
            self._reopen_failed = False
            suggestions = Suggestions(self.annotations, _all_paths(new)) if self.annotations else None
            self.index, self.suggestions = new, suggestions
            self._text_cache = OrderedDict()  # its calibration settings may have changed
            log.info("index %s re-opened: %d images (was %d)", new.directory, len(new), len(old))
            return True

    # ---- metadata ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def can_calibrate(self) -> bool:
        return self.index.has_calibrated

    @property
    def can_rerank(self) -> bool:
        return self.index.has_rerank

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": len(self.index),
            "model": self.index.model_name,
            "combining": "combiner" if self.index.combiner is not None else "sum",
            "calibration": self.can_calibrate,
            "suggestions": bool(self.suggestions and len(self.suggestions)),
            "rerank": self.can_rerank,
        }

    def has(self, image_id: int) -> bool:
        return self._lookup(image_id) is not None

    def _lookup(self, image_id: int) -> ImageRecord | None:
        """The index's record of ``image_id`` (path recorded at build time), or None."""
        if image_id not in self.index:
            return None
        try:
            return self.index.get_image(image_id)
        except KeyError:
            return None

    def rel_path(self, image_id: int) -> str:
        rec = self._lookup(image_id)
        from calibclip.index.storage import display

        return "" if rec is None else display(str(rec.relpath))  # non-UTF-8 file names shown escaped

    # ---- queries -----------------------------------------------------------------------------
    def search(
        self,
        text: str | None,
        image: int | Path | None,
        k: int,
        calibrate: bool,
        rerank: bool = False,
        rerank_top_k: int | None = None,
    ) -> list[SearchResult]:
        """Text, image or composed search; the text's encoder forward is micro-batched with
        concurrent queries when batching is on (results equal to the unbatched path). ``rerank``: the
        index's trained re-ranker re-scores the top ``rerank_top_k`` (one text forward gives the query
        vector and its tokens, so a re-ranked query is not micro-batched)."""
        index = self.index
        if rerank:
            with self.lock:
                return index.search(
                    text=text, image=image, k=k, calibrate=calibrate, rerank=True, rerank_top_k=rerank_top_k
                )
        if text and self.batcher is not None:
            features = self.batcher.submit((text, calibrate))
            if isinstance(image, Path):  # an upload: its image forward runs here
                with self.lock:
                    query = index.query_from_features(features, image, calibrate)
            else:
                query = index.query_from_features(features, image, calibrate)
            return index.search(k=k, calibrate=calibrate, query=query)
        with self.lock:
            return index.search(text=text, image=image, k=k, calibrate=calibrate)

    def _encode_texts(self, items: list[tuple[str, bool]]) -> list[dict[str, torch.Tensor]]:
        """Batch function of the micro-batcher: one forward per calibration setting for the distinct
        texts of ``items`` not encoded recently. Recent texts come from a cache, so that a query gives
        the same vector (and the same answer) whichever batch it lands in: a batched forward's rows
        can differ from a lone forward's in the last float bits."""
        cache = self._text_cache
        with self.lock:
            for flag in (False, True):
                texts = [t for t in dict.fromkeys(t for t, c in items if c == flag) if (t, flag) not in cache]
                if texts:
                    feats = self.index.encode_texts(texts, calibrate=flag)
                    for j, t in enumerate(texts):
                        cache[(t, flag)] = {name: v[j].clone() for name, v in feats.items()}
            out = []
            for item in items:
                cache.move_to_end(item)
                out.append(cache[item])
            while len(cache) > TEXT_CACHE:
                cache.popitem(last=False)
        return out

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

    def image_bytes(self, source: int | Path, thumb: bool) -> bytes:
        """JPEG bytes of an image (re-encoded through the project's decoder; thumbnails cached)."""
        path = self.image_file(source)
        try:
            mtime = path.stat().st_mtime
            return self._image_cache(path, mtime, thumb)
        except (OSError, ImageError) as exc:
            what = source if isinstance(source, int) else "upload"
            raise ImageNotFound(f"image file for {what} is no longer readable") from exc

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
        try:
            keys = [(s, self.image_file(s).stat().st_mtime_ns) for s in sources]
        except OSError as exc:
            raise ImageNotFound("an image to explain is no longer readable (deleted or expired upload)") from exc
        with self.lock, torch.inference_mode():
            todo = [k for k in dict.fromkeys(keys) if k not in self._explained]
            if todo:
                try:
                    pixels = self.index.pixels([self.image_file(s) for s, _ in todo])
                except ImageError as exc:
                    raise ImageNotFound(f"an image to explain cannot be decoded any more ({exc.reason})") from exc
                exps = self.calibrator().explain_image(pixels)
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

    def rerank_depth(self, rerank_top_k: int | None) -> int:
        """How many of a re-ranked search's first hits the re-ranker re-scored."""
        return int(self.index.reranking(True, rerank_top_k).top_k)

    def explain_match(self, text: str, image_id: int) -> Any:
        """The re-ranker's word -> region attention for (``text``, indexed ``image_id``), from the stored
        tokens (`Index.explain_match`); the latest ones are cached."""
        key = (text, int(image_id), self.index.version)
        with self.lock:
            exp = self._matches.get(key)
            if exp is None:
                exp = self._matches[key] = self.index.explain_match(text, int(image_id))
            self._matches.move_to_end(key)
            while len(self._matches) > EXPLAIN_CACHE:
                self._matches.popitem(last=False)
        return exp

    def match_png(self, text: str, image_id: int) -> bytes:
        """PNG of the image under each query word's re-ranker cross-attention (`render_match`)."""
        import tempfile

        from calibclip.calibration.reranker import render_match

        exp = self.explain_match(text, image_id)
        try:
            img = load_image(self.image_file(image_id))
        except ImageError as exc:
            raise ImageNotFound(f"the image cannot be decoded any more ({exc.reason})") from exc
        img.thumbnail((384, 384), Image.Resampling.BICUBIC)
        with tempfile.TemporaryDirectory(prefix="calibclip-match-") as tmp, self.lock:
            path = render_match(img, exp, Path(tmp) / "match.png")
            return path.read_bytes()

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


def _all_paths(index: Index) -> dict[int, str]:
    """Indexed id -> path relative to the indexed folder, used to match annotation names to ids."""
    root = Path(index.images_dir)
    out = {}
    for i, p in index.paths():
        try:
            out[int(i)] = Path(p).relative_to(root).as_posix()
        except ValueError:
            out[int(i)] = Path(p).name
    return out


def _recorded_annotations(index: Index) -> list[Annotation]:
    """Annotations of the dataset the index was built from, found by the CIRR / CSS (``calibclip
    make-css``) / FashionIQ layout: ``captions/cap.*.json`` in the indexed folder or its parent."""
    root = Path(index.images_dir)
    files = sorted({p for d in (root, root.parent) for p in (d / "captions").glob("cap.*.json")})
    return [a for f in files for a in read_annotations(f)]
