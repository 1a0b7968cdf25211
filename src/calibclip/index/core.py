"""`Index`: the Python API over an index folder (build, open, search, look-ups). The CLI and the
web app are thin layers over it.

Searches are thread-safe: the stored vectors are read-only memory maps, lazily built state (the
encoder, the in-memory gallery matrix, FAISS structures, the Combiner) is created under a lock,
and FAISS search parameters are passed per call.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from calibclip.index.ann import AnnIndex, resolve_kind
from calibclip.index.build import BuildReport, build_index, check_model, install_combiner
from calibclip.index.search import ExactSearcher, normalize
from calibclip.index.storage import ImageRecord, SkippedFile, Storage, read_meta
from calibclip.models.base import Encoder

ImageQuery = int | str | os.PathLike | bytes | Any  # indexed id, indexed/real path, bytes or PIL image


@dataclass(frozen=True)
class SearchResult:
    """One hit: the image ``id`` (stable across updates unless the file changes), its absolute
    ``path`` and ``relpath`` under the indexed folder, cosine ``score`` and 1-based ``rank``."""

    id: int
    path: str
    score: float
    rank: int
    relpath: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Query:
    """Query vectors (un-normalised) and the indexed reference image, if any."""

    raw: torch.Tensor
    calibrated: torch.Tensor | None
    reference_id: int | None


def _model_spec(model: str | os.PathLike | Encoder) -> str | None:
    if isinstance(model, Encoder):
        return model.spec or model.name
    key = str(model)
    return str(Path(key).resolve()) if os.path.exists(key) else key


class Index:
    """An opened index. Use `Index.build` or `Index.open`; see README "Indexing a folder and searching it"."""

    def __init__(self, directory: str | os.PathLike, encoder: Encoder | None = None, device: str = "cpu"):
        self.directory = Path(directory)
        self._storage = Storage(self.directory, writable=False)
        with self._storage.snapshot():  # metadata and rows of the same commit
            self._meta = self._storage.meta()
            rows, ids = self._storage.row_ids()
        self._device = device
        self._lock = threading.RLock()
        self._encoder: Encoder | None = None
        if encoder is not None:
            check_model(self._storage, encoder)
            self._encoder = encoder
        self._rows = self._meta["rows"]
        self._live_rows, self._ids = rows, ids
        self._id_order = np.argsort(ids, kind="stable")
        self._id_set = set(ids.tolist())
        self.report: BuildReport | None = None
        self._searchers: dict[str, ExactSearcher] = {}
        self._ann: dict[str, AnnIndex] = {}
        self._combining: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._calibrator: Any = None

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        images_dir: str | os.PathLike,
        out_dir: str | os.PathLike,
        model: str | os.PathLike | Encoder | None = None,
        batch_size: int = 32,
        workers: int | None = None,
        calibrate: bool | None = None,
        combiner: str | os.PathLike | None = None,
        precision: str | None = None,
        device: str = "cpu",
        progress: bool = True,
        calibration: dict[str, Any] | None = None,
        calibration_method: str | None = None,
    ) -> "Index":
        """Index (or incrementally update) ``images_dir`` into ``out_dir`` and open the result.

        ``model``: registered name, checkpoint path or an `Encoder` (default: the model an existing
        index records, else ``starter``); ``precision`` likewise (default fp32). ``workers``: decoding
        processes (default: cores - 1, at most 4). ``calibrate``: also store CalibCLIP-calibrated
        image embeddings (None: keep what an existing index has). ``combiner``: a Combiner
        checkpoint copied into the index for composed queries. ``calibration_method``: a registered
        calibration method (default: the recorded one, else ``calibclip``). The run's `BuildReport`
        is kept as ``index.report``.
        """
        recorded = read_meta(out_dir)
        model = model if model is not None else recorded.get("model_spec") or "starter"
        precision = precision or recorded.get("precision") or "fp32"
        encoder = model if isinstance(model, Encoder) else _create(model, device, precision)
        if workers is None:
            workers = default_workers()
        report = build_index(
            images_dir, out_dir, encoder, model_spec=_model_spec(model), batch_size=batch_size, workers=workers,
            calibrate=calibrate, calibration=calibration, combiner=combiner, progress=progress,
            calibration_method=calibration_method,
        )
        index = cls(out_dir, encoder=encoder, device=device)
        index.report = report
        return index

    @classmethod
    def open(
        cls, directory: str | os.PathLike, model: str | os.PathLike | Encoder | None = None, device: str = "cpu",
    ) -> "Index":
        """Open an index. ``model`` (optional) must be the model it was built with (checked by
        fingerprint); by default the recorded model is loaded on the first query that needs it."""
        encoder = None
        if model is not None:
            if isinstance(model, Encoder):
                encoder = model
            else:
                encoder = _create(model, device, read_meta(directory).get("precision", "fp32"))
        return cls(directory, encoder=encoder, device=device)

    def close(self) -> None:
        self._storage.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # --- properties --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"Index({str(self.directory)!r}: {len(self)} images, model {self.model_name!r})"

    @property
    def images_dir(self) -> Path:
        return Path(self._meta["root"])

    @property
    def model_name(self) -> str:
        return str(self._meta.get("model"))

    @property
    def fingerprint(self) -> str:
        return str(self._meta.get("fingerprint"))

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def vector_sets(self) -> list[str]:
        return list(self._meta.get("vector_sets", []))

    @property
    def has_calibrated(self) -> bool:
        return "calibrated" in self.vector_sets

    @property
    def combiner(self) -> Path | None:
        """The Combiner checkpoint stored in the index (used for composed queries), if any."""
        name = (self._meta.get("combiner") or {}).get("file")
        return self.directory / name if name and (self.directory / name).exists() else None

    @property
    def ids(self) -> np.ndarray:
        """Ids of the indexed images, in storage order."""
        return self._ids.copy()

    @property
    def encoder(self) -> Encoder:
        """The index's encoder (loaded from the recorded model on first use, fingerprint-checked)."""
        with self._lock:
            if self._encoder is None:
                spec = self._meta.get("model_spec")
                if not spec:
                    raise ValueError(f"index {self.directory} does not record how to load its model; pass model=")
                encoder = _create(spec, self._device, self._meta.get("precision", "fp32"))
                check_model(self._storage, encoder)
                self._encoder = encoder
            return self._encoder

    def info(self) -> dict[str, Any]:
        """Summary: count, skipped, model, fingerprint, dim, vector sets, combiner, sizes."""
        meta = self._meta
        size = sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())
        return {
            "count": len(self), "skipped": self._storage.skipped_count(), "model": meta.get("model"),
            "model_spec": meta.get("model_spec"), "fingerprint": meta.get("fingerprint"), "dim": meta.get("dim"),
            "precision": meta.get("precision"), "vector_sets": meta.get("vector_sets"), "rows": meta.get("rows"),
            "images_dir": meta.get("root"), "calibration": meta.get("calibration"),
            "combiner": str(self.combiner) if self.combiner else None, "version": meta.get("version"),
            "created": meta.get("created"), "updated": meta.get("updated"), "disk_bytes": size,
            "preprocess": (meta.get("model_config") or {}).get("preprocess"),
        }

    def skipped(self) -> list[SkippedFile]:
        """Files that could not be indexed, with their reason."""
        return self._storage.skipped()

    # --- look-ups ------------------------------------------------------------------------------
    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, (int, np.integer)) and int(image_id) in self._id_set

    def _positions(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions (storage order) of ``ids``; KeyError for ids not in the index."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64)
        sorted_ids = self._ids[self._id_order]
        where = np.searchsorted(sorted_ids, ids)
        where = np.clip(where, 0, max(len(sorted_ids) - 1, 0))
        if len(sorted_ids) == 0 or not np.array_equal(sorted_ids[where], ids):
            missing = ids if len(sorted_ids) == 0 else ids[sorted_ids[where] != ids]
            raise KeyError(f"image id(s) {missing[:5].tolist()} not in index {self.directory}")
        return self._id_order[where]

    def _record(self, row: tuple) -> ImageRecord:
        i, rel, size, mtime, digest, w, h, _ = row
        return ImageRecord(int(i), rel, self.images_dir / rel, size, mtime, digest, w, h)

    def get_image(self, image_id: int) -> ImageRecord:
        """Metadata of an indexed image (KeyError if the id is unknown)."""
        self._positions([image_id])
        rec = self._storage.records([int(image_id)]).get(int(image_id))
        if rec is None:
            raise KeyError(f"image id {image_id} not in index {self.directory}")
        return self._record(rec)

    def path_of(self, image_id: int) -> Path:
        """Absolute file path of an indexed image (ids only come from the index, never paths)."""
        return self.get_image(image_id).path

    def paths(self) -> Iterator[tuple[int, Path]]:
        """``(id, absolute path)`` of every indexed image, in storage order."""
        recs = self._storage.records(self._ids.tolist())
        for i in self._ids.tolist():
            yield i, self.images_dir / recs[i][1]

    def find(self, path: str | os.PathLike) -> int | None:
        """Id of the image at ``path`` (relative to the indexed folder, or absolute inside it)."""
        p = Path(path)
        candidates = [p.as_posix()]
        try:
            candidates.append(p.resolve().relative_to(self.images_dir.resolve()).as_posix())
        except (ValueError, OSError):
            pass
        if p.is_absolute():
            try:
                candidates.append(p.relative_to(self.images_dir).as_posix())
            except ValueError:
                pass
        for c in candidates:
            found = self._storage.lookup_path(c)
            if found is not None and found in self._id_set:
                return found
        return None

    def sample(self, n: int, seed: int | None = None) -> list[int]:
        """``n`` distinct random image ids (all of them if ``n >= len``), reproducible by ``seed``."""
        rng = np.random.default_rng(seed)
        n = min(int(n), len(self))
        return [int(i) for i in rng.choice(self._ids, size=n, replace=False)] if n > 0 else []

    def features(self, name: str = "raw", ids: Sequence[int] | None = None) -> np.ndarray:
        """Stored (un-normalised) float32 vectors ``[N, D]`` of ``ids`` (default: all, storage order)."""
        if name not in self.vector_sets:
            raise ValueError(
                f"index {self.directory} has no {name!r} vectors (it has {self.vector_sets})"
                + ("; re-run `calibclip index --calibrate`" if name == "calibrated" else "")
            )
        pos = np.arange(len(self)) if ids is None else self._positions(ids)
        vectors = self._storage.vectors(name, self._rows)
        return np.asarray(vectors[self._live_rows[pos]], dtype=np.float32)

    # --- search machinery ------------------------------------------------------------------------
    def searcher(self, name: str = "raw") -> ExactSearcher:
        """The exact searcher over vector set ``name`` (shared, lazily created)."""
        with self._lock:
            if name not in self._searchers:
                self.features(name, ids=[])  # validates the name
                self._searchers[name] = ExactSearcher(
                    self._storage.vectors(name, self._rows), self._storage.norms(name, self._rows), self._live_rows
                )
            return self._searchers[name]

    def ann_index(self, kind: str, name: str = "raw") -> AnnIndex:
        """The FAISS index ``kind`` (ivf | hnsw) over vector set ``name``: loaded from
        ``INDEX_DIR/ann/`` when current, else built (and saved when the folder is writable)."""
        key = f"{name}.{kind}"
        with self._lock:
            if key not in self._ann:
                path = self.directory / "ann" / f"{key}.faiss"
                expect = {"version": self._meta.get("version"), "generation": self._meta.get("generation"),
                          "count": len(self), "kind": kind}
                ann = AnnIndex.load(path, expect)
                if ann is None:
                    searcher = self.searcher(name)
                    matrix = searcher.matrix()
                    if matrix is None:
                        matrix = torch.cat([searcher.chunk(s, min(len(self), s + 65536))
                                            for s in range(0, len(self), 65536)])
                    ann = AnnIndex.build(kind, matrix.numpy())
                    try:
                        ann.save(path, expect)
                    except OSError as exc:
                        warnings.warn(f"could not save the {kind} index under {path.parent} ({exc}); kept in memory",
                                      stacklevel=2)
                self._ann[key] = ann
            return self._ann[key]

    def search_vectors(
        self, queries: np.ndarray | torch.Tensor, k: int = 10, ann: str = "auto", nprobe: int | None = None,
        ef_search: int | None = None, name: str = "raw",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` cosine search of query vectors ``[Q, D]`` (any norm): ``(scores, ids)`` ``[Q, k']``
        with ``k' = min(k, len)``. Approximate kinds may return id -1 / score -inf when they find fewer."""
        scores, pos = self._search_positions(normalize(queries), k, ann, nprobe, ef_search, name)
        ids = np.where(pos >= 0, self._ids[np.clip(pos, 0, None)], -1) if len(self) else pos
        return scores, ids

    def _search_positions(
        self, q: torch.Tensor, k: int, ann: str, nprobe: int | None, ef_search: int | None, name: str = "raw",
    ) -> tuple[np.ndarray, np.ndarray]:
        kind = resolve_kind(ann, len(self))
        k = min(int(k), len(self))
        if kind == "exact" or k <= 0:
            return self.searcher(name).search(q, k)
        scores, pos = self.ann_index(kind, name).search(q.numpy(), k, nprobe=nprobe, ef_search=ef_search)
        scores = np.where(pos >= 0, scores, -np.inf).astype(np.float32)
        return scores, pos.astype(np.int64)

    def calibrator(self) -> Any:
        """The `Calibrator` with the settings the calibrated vectors were computed with."""
        with self._lock:
            if self._calibrator is None:
                if not self.has_calibrated:
                    raise ValueError(
                        f"index {self.directory} has no calibrated vectors; re-run `calibclip index IMAGES_DIR --out "
                        f"{self.directory} --calibrate` to add them"
                    )
                from calibclip.calibration.methods import create_calibrator

                self._calibrator = create_calibrator(self.encoder, recorded=self._meta.get("calibration") or {})
            return self._calibrator

    def combining(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The image+text combining function: the index's Combiner if it has one, else the sum."""
        with self._lock:
            if self._combining is None:
                from calibclip.composed import build_combining

                if self.combiner is not None:
                    self._combining = build_combining("combiner", self.combiner, encoder=self.encoder)
                else:
                    self._combining = build_combining("sum", None)
            return self._combining

    def attach_combiner(self, path: str | os.PathLike) -> None:
        """Copy a Combiner checkpoint into the index; composed queries use it from now on."""
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"combiner checkpoint {src} does not exist (expected RUN_DIR/best.pt)")
        if self._encoder is not None or self._meta.get("model_spec"):
            from calibclip.composed import build_combining

            build_combining("combiner", src, encoder=self.encoder)  # refuse a checkpoint of another encoder now
        writer = Storage(self.directory, writable=True)
        try:
            install_combiner(writer, src)
        finally:
            writer.close()
        with self._lock:
            self._meta = self._storage.meta()
            self._combining = None

    # --- queries -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, text: str, calibrate: bool = False) -> dict[str, torch.Tensor]:
        """``{"raw": [D]}`` (plus ``"calibrated"``) query features of a text."""
        if calibrate:
            return {k: v[0].float().cpu() for k, v in self.calibrator().text_features([text]).items()}
        enc = self.encoder
        return {"raw": enc.encode_text(enc.tokenize([text]).to(enc.device))[0].float().cpu()}

    @torch.inference_mode()
    def encode_image(self, image: ImageQuery, calibrate: bool = False) -> tuple[dict[str, torch.Tensor], int | None]:
        """Features of an image query and its id when it is an indexed image (an int id, or a path
        that the index holds: its stored vectors are used, consistent with the gallery)."""
        image_id: int | None = None
        if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
            image_id = int(image)
            self._positions([image_id])
        elif isinstance(image, (str, os.PathLike)):
            image_id = self.find(image)
            if image_id is None and not Path(image).is_file():
                raise FileNotFoundError(
                    f"--image {image}: neither an image of this index (relative to {self.images_dir}) "
                    "nor an existing file"
                )
        if image_id is not None:
            names = ["raw", "calibrated"] if calibrate else ["raw"]
            if calibrate:
                self.calibrator()
            return {n: torch.from_numpy(self.features(n, [image_id])[0]) for n in names}, image_id
        from calibclip.data.images import load_image

        enc = self.encoder
        pixels = enc.preprocess(load_image(image))[None].to(enc.device, enc.dtype)
        if calibrate:
            return {k: v[0].float().cpu() for k, v in self.calibrator().image_features(pixels).items()}, None
        return {"raw": enc.encode_image(pixels)[0].float().cpu()}, None

    def query(self, text: str | None = None, image: ImageQuery | None = None, calibrate: bool = False) -> Query:
        """Query vectors for text-only, image-only or composed (image + text) search."""
        if not text and image is None:
            raise ValueError("a search needs --text, --image or both")
        txt = self.encode_text(text, calibrate) if text else None
        img, ref = self.encode_image(image, calibrate) if image is not None else (None, None)
        if txt is not None and img is not None:
            fn = self.combining()
            vec = {n: fn(img[n][None], txt[n][None])[0].float() for n in txt}
        else:
            vec = txt if txt is not None else img  # type: ignore[assignment]
        return Query(vec["raw"], vec.get("calibrated"), ref)  # type: ignore[index, union-attr]

    def search(
        self,
        text: str | None = None,
        image: ImageQuery | None = None,
        k: int = 10,
        calibrate: bool = False,
        ann: str = "auto",
        nprobe: int | None = None,
        ef_search: int | None = None,
        exclude_reference: bool = True,
    ) -> list[SearchResult]:
        """Search by ``text``, ``image`` (indexed id, indexed or other path, bytes, PIL image) or both.

        Composed queries use the index's Combiner (else the normalised sum) and, with
        ``exclude_reference``, leave an indexed reference image out of the results.
        ``calibrate``: exact/ANN top-K by raw similarity, then CalibCLIP's fused score for those
        candidates (see README "Indexing a folder and searching it"). ``ann``: auto | exact | ivf | hnsw.
        """
        if k < 1:
            raise ValueError(f"k (--top-k) must be >= 1, got {k}")
        q = self.query(text, image, calibrate)
        exclude = q.reference_id if (q.reference_id is not None and text and exclude_reference) else None
        want = k + (exclude is not None)
        cal = self.calibrator() if calibrate else None
        depth = max(want, int(cal.config.top_k) + (exclude is not None)) if cal is not None else want
        scores, pos = self._search_positions(normalize(q.raw), depth, ann, nprobe, ef_search)
        scores, pos = scores[0], pos[0]
        keep = pos >= 0
        if exclude is not None:
            keep &= self._ids[np.clip(pos, 0, None)] != exclude
        scores, pos = scores[keep], pos[keep]
        if cal is not None and len(pos):
            sim_cal = self.searcher("calibrated").scores_at(normalize(q.calibrated), pos[None])[0]
            fused = np.asarray(cal.fuse(scores[None].astype(np.float64), sim_cal[None].astype(np.float64)))[0]
            order = np.argsort(-fused, kind="stable")
            reranked = np.arange(len(pos)) < min(int(cal.config.top_k), len(pos))  # scores are sorted by raw
            shown = np.where(reranked, fused, scores)
            scores, pos = shown[order], pos[order]
        scores, pos = scores[:k], pos[:k]
        ids = self._ids[pos]
        recs = self._storage.records(ids.tolist())
        return [
            SearchResult(int(i), str(self.images_dir / recs[int(i)][1]), float(s), r + 1, recs[int(i)][1])
            for r, (i, s) in enumerate(zip(ids, scores, strict=True))
        ]


def default_workers() -> int:
    """Decoding processes: CPU cores - 1, between 0 and 4."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _create(spec: str | os.PathLike, device: str, precision: str) -> Encoder:
    from calibclip.models.registry import create_model

    return create_model(spec, device=device, precision=precision)
