"""`Index`: the Python API over an index (build, open, search, look-ups). The CLI and the web app
are thin layers over it.

An index lives in a `VectorStore` (calibclip.index.stores): a local folder or any registered
backend (``milvus:PATH.db``, ``milvus:http://HOST:PORT``, ...). `Index` talks to the store through
that protocol only.

Searches are thread-safe: stores are read through a snapshot taken at open, lazily built state
(the encoder, searchers, ANN structures, the Combiner) is created under a lock, and search
parameters are passed per call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibclip.index.build import (
    RERANK_TOKENS,
    BuildReport,
    build_index,
    check_model,
    install_combiner,
    stored_reranker,
)
from calibclip.index.search import normalize
from calibclip.index.storage import ImageRecord, SkippedFile
from calibclip.index.stores import VectorStore, open_store, read_store_meta
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
    composed: bool = False  # image + text (an indexed reference is then left out of the results)


def _model_spec(model: str | os.PathLike | Encoder) -> str | None:
    if isinstance(model, Encoder):
        return model.spec or model.name
    key = str(model)
    return str(Path(key).resolve()) if os.path.exists(key) else key


class Index:
    """An opened index. Use `Index.build` or `Index.open`; see docs/indexing-stores.md.

    Args:
        store: an opened `VectorStore`, or a store spec (folder path, ``milvus:...``, ``SCHEME:...``).
        encoder: the model (fingerprint-checked against the index); default: loaded from the
            recorded ``model_spec`` on first use.
        device: device for the lazily loaded model.
        store_options: backend options when ``store`` is a spec (Milvus: ``token``).
    """

    def __init__(
        self,
        store: VectorStore | str | os.PathLike,
        encoder: Encoder | None = None,
        device: str = "cpu",
        store_options: dict[str, Any] | None = None,
    ):
        self.store = store if isinstance(store, VectorStore) else open_store(store, options=store_options)
        self.location = self.store.spec
        self.directory = Path(self.location)
        self._meta = self.store.meta()
        ids = self.store.ids()
        self._device = device
        self._lock = threading.RLock()
        self._encoder: Encoder | None = None
        if encoder is not None:
            check_model(self.store, encoder)
            self._encoder = encoder
        self._ids = ids
        self._id_order = np.argsort(ids, kind="stable")
        self._id_set = set(ids.tolist())
        self.report: BuildReport | None = None
        self._combining: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._calibrator: Any = None
        self._rerankings: dict[tuple[str, int | None], Any] = {}

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
        store_options: dict[str, Any] | None = None,
        engine: str = "local",
        engine_options: dict[str, Any] | None = None,
        rerank: str | os.PathLike | bool | None = None,
    ) -> Index:
        """Index (or incrementally update) ``images_dir`` into the store ``out_dir`` and open the result.

        Args:
            images_dir: folder of images (walked recursively).
            out_dir: store spec: a folder, ``milvus:PATH.db``, ``milvus:http://HOST:PORT`` or ``SCHEME:...``.
            model: registered name, checkpoint path or an `Encoder` (default: the model an existing
                index records, else ``starter``).
            batch_size: images per encoded and committed batch.
            workers: decoding processes of the local engine (default: cores - 1, at most 4).
            calibrate: also store CalibCLIP-calibrated image embeddings (None: keep what an existing
                index has).
            combiner: a Combiner checkpoint copied into the index for composed queries.
            precision: model precision (default: the existing index's, else fp32).
            device: model device.
            progress: show a progress bar.
            calibration: overrides of `CalibrationConfig` fields.
            calibration_method: a registered calibration method (default: the recorded one, else ``calibclip``).
            store_options: backend options (Milvus: ``token``).
            engine: ``local`` or ``ray`` (Ray Data; ``engine_options``: ``address``, ``num_workers``,
                ``gpus_per_worker``, ``num_cpus``).
            engine_options: options of the Ray engine.
            rerank: also store the trained re-ranker's projected fp16 image tokens (enables
                ``search(rerank=...)``): a re-ranker folder, or True for the encoder's packaged one; None
                keeps what an existing index has, False drops them (see `calibclip.index.build.build_index`).

        Returns:
            The opened index; the run's `BuildReport` is ``index.report``.
        """
        recorded = read_store_meta(out_dir, store_options)
        model = model if model is not None else recorded.get("model_spec") or "starter"
        precision = precision or recorded.get("precision") or "fp32"
        encoder = model if isinstance(model, Encoder) else _create(model, device, precision)
        if workers is None:
            workers = default_workers()
        report = build_index(
            images_dir,
            out_dir,
            encoder,
            model_spec=_model_spec(model),
            batch_size=batch_size,
            workers=workers,
            calibrate=calibrate,
            calibration=calibration,
            combiner=combiner,
            progress=progress,
            calibration_method=calibration_method,
            store_options=store_options,
            engine=engine,
            engine_options=engine_options,
            rerank=rerank,
        )
        index = cls(out_dir, encoder=encoder, device=device, store_options=store_options)
        index.report = report
        return index

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        model: str | os.PathLike | Encoder | None = None,
        device: str = "cpu",
        store_options: dict[str, Any] | None = None,
    ) -> Index:
        """Open an index.

        Args:
            directory: store spec: an index folder, ``milvus:PATH.db``, ``milvus:http://HOST:PORT``, ...
            model: must be the model it was built with (checked by fingerprint); by default the
                recorded model is loaded on the first query that needs it.
            device: model device.
            store_options: backend options (Milvus: ``token``).

        Raises:
            FileNotFoundError: no index there.
            ValueError: ``model`` is not the index's model.
        """
        store = open_store(directory, options=store_options)
        try:
            encoder = None
            if model is not None:
                if isinstance(model, Encoder):
                    encoder = model
                else:
                    encoder = _create(model, device, store.get("precision", "fp32"))
            return cls(store, encoder=encoder, device=device)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # --- properties --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"Index({self.location!r}: {len(self)} images, model {self.model_name!r})"

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
    def has_rerank(self) -> bool:
        """Whether the index stores the trained re-ranker's image tokens (``search(rerank=...)``)."""
        return bool(self._meta.get("reranker")) and RERANK_TOKENS in (self._meta.get("token_sets") or {})

    @property
    def reranker_info(self) -> dict[str, Any] | None:
        """What the index records about its re-ranker (source folder, weights sha256, projection id,
        token shape ``[N, width]``, grid, config), or None."""
        rec = self._meta.get("reranker")
        return dict(rec) if rec else None

    @property
    def combiner(self) -> Path | None:
        """The Combiner checkpoint stored in the index (used for composed queries), if any."""
        name = (self._meta.get("combiner") or {}).get("file")
        return self.store.file_path(name) if name else None

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
                    raise ValueError(f"index {self.location} does not record how to load its model; pass model=")
                encoder = _create(spec, self._device, self._meta.get("precision", "fp32"))
                check_model(self.store, encoder)
                self._encoder = encoder
            return self._encoder

    def info(self) -> dict[str, Any]:
        """Summary: store, count, skipped, model, fingerprint, dim, vector sets, combiner, sizes."""
        meta = self._meta
        return {
            "store": self.location,
            "backend": self.store.scheme,
            "count": len(self),
            "skipped": self.store.skipped_count(),
            "model": meta.get("model"),
            "model_spec": meta.get("model_spec"),
            "fingerprint": meta.get("fingerprint"),
            "dim": meta.get("dim"),
            "precision": meta.get("precision"),
            "vector_sets": meta.get("vector_sets"),
            "rows": meta.get("rows"),
            "images_dir": meta.get("root"),
            "calibration": meta.get("calibration"),
            "combiner": str(self.combiner) if self.combiner else None,
            "reranker": self.reranker_info,
            "version": meta.get("version"),
            "created": meta.get("created"),
            "updated": meta.get("updated"),
            "disk_bytes": self.store.disk_bytes(),
            "preprocess": (meta.get("model_config") or {}).get("preprocess"),
        }

    def skipped(self) -> list[SkippedFile]:
        """Files that could not be indexed, with their reason."""
        return self.store.skipped()

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
            raise KeyError(f"image id(s) {missing[:5].tolist()} not in index {self.location}")
        return self._id_order[where]

    def _record(self, row: tuple) -> ImageRecord:
        i, rel, size, mtime, digest, w, h = row[:7]
        return ImageRecord(int(i), rel, self.images_dir / rel, size, mtime, digest, w, h)

    def get_image(self, image_id: int) -> ImageRecord:
        """Metadata of an indexed image (KeyError if the id is unknown)."""
        self._positions([image_id])
        rec = self.store.records([int(image_id)]).get(int(image_id))
        if rec is None:
            raise KeyError(f"image id {image_id} not in index {self.location}")
        return self._record(rec)

    def path_of(self, image_id: int) -> Path:
        """Absolute file path of an indexed image (ids only come from the index, never paths)."""
        return self.get_image(image_id).path

    def paths(self) -> Iterator[tuple[int, Path]]:
        """``(id, absolute path)`` of every indexed image, in storage order."""
        recs = self.store.records(self._ids.tolist())
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
            found = self.store.lookup_path(c)
            if found is not None and found in self._id_set:
                return found
        return None

    def sample(self, n: int, seed: int | None = None) -> list[int]:
        """``n`` distinct random image ids (all of them if ``n >= len``), reproducible by ``seed``."""
        rng = np.random.default_rng(seed)
        n = min(int(n), len(self))
        return [int(i) for i in rng.choice(self._ids, size=n, replace=False)] if n > 0 else []

    def features(self, name: str = "raw", ids: Sequence[int] | None = None) -> np.ndarray:
        """Stored (un-normalised) float32 vectors ``[N, D]`` of ``ids`` (default: all, storage order).

        Raises:
            ValueError: the index has no vector set ``name``.
            KeyError: an id not in the index.
        """
        if name not in self.vector_sets:
            raise ValueError(
                f"index {self.location} has no {name!r} vectors (it has {self.vector_sets})"
                + ("; rebuild it with calibrate=True" if name == "calibrated" else "")
            )
        if ids is not None:
            self._positions(ids)
        return self.store.vectors(name, None if ids is None else np.asarray(ids, dtype=np.int64))

    # --- search machinery ------------------------------------------------------------------------
    def search_vectors(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int = 10,
        ann: str = "auto",
        nprobe: int | None = None,
        ef_search: int | None = None,
        name: str = "raw",
        params: dict[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` cosine search of query vectors ``[Q, D]`` (any norm).

        Args:
            queries: query vectors.
            k: results per query.
            ann: ``auto`` or a kind of the store's backend (local: exact, ivf, hnsw).
            nprobe: IVF cells scanned per query (shorthand for ``params={"nprobe": ...}``).
            ef_search: HNSW candidate list size (shorthand for ``params={"ef_search": ...}``).
            name: vector set.
            params: per-call search parameters, validated by the backend.

        Returns:
            ``(scores, ids)`` ``[Q, k']`` with ``k' = min(k, len)``; approximate kinds may return id -1 /
            score -inf when they find fewer.
        """
        given = {"nprobe": nprobe, "ef_search": ef_search, **(params or {})}
        return self._search_ids(normalize(queries), k, ann, given, name)

    def _search_ids(
        self,
        q: torch.Tensor,
        k: int,
        ann: str,
        params: dict[str, Any],
        name: str = "raw",
    ) -> tuple[np.ndarray, np.ndarray]:
        kind = self.store.resolve_kind(ann, len(self))
        checked = self.store.check_params(kind, params)
        k = min(int(k), len(self))
        if name not in self.vector_sets:
            self.features(name, ids=[])  # the clear error
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        return self.store.search(name, q.numpy(), k, kind, checked)

    def resolve_ann(self, ann: str) -> str:
        """The search kind ``ann`` resolves to for this index (``auto`` depends on its size)."""
        return self.store.resolve_kind(ann, len(self))

    def calibrator(self) -> Any:
        """The `Calibrator` with the settings the calibrated vectors were computed with."""
        with self._lock:
            if self._calibrator is None:
                if not self.has_calibrated:
                    raise ValueError(
                        f"index {self.location} has no calibrated vectors; rebuild it with calibrate=True "
                        "(Index.build) to add them"
                    )
                from calibclip.calibration.methods import create_calibrator

                self._calibrator = create_calibrator(self.encoder, recorded=self._meta.get("calibration") or {})
            return self._calibrator

    def combining(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The image+text combining function: the index's Combiner if it has one, else the encoder's
        packaged Combiner, else the normalised sum (`calibclip.composed.default_combining`)."""
        with self._lock:
            if self._combining is None:
                from calibclip.composed import default_combining

                self._combining = default_combining(self.encoder, self.combiner)
            return self._combining

    def reranking(self, source: Any = True, top_k: int | None = None) -> Any:
        """The trained re-ranking stage (`calibclip.calibration.reranker.Reranking`) over this index's stored
        image tokens.

        Args:
            source: True / None / ``"index"``: the re-ranker the index was built with (its copy in the
                index); ``"packaged"``: the encoder's packaged one; a re-ranker folder; or a `Reranking`.
            top_k: candidates re-scored per query (default: the re-ranker's ``top_k``).

        Raises:
            ValueError: the index stores no re-ranker tokens (the message says how to rebuild it), the
                re-ranker is of another encoder, or it projects image tokens differently from the
                re-ranker the index was built with.
            FileNotFoundError: ``source`` is not a re-ranker folder.
        """
        from calibclip.calibration.reranker import Reranking, create_reranking, weights_sha256

        rec = self.reranker_info
        if not self.has_rerank or rec is None:
            raise ValueError(
                f"index {self.location} holds no re-ranker tokens; rebuild it with them: calibclip index "
                f"{self._meta.get('root') or 'IMAGES_DIR'} --out {self.location} --rerank [PATH]"
            )
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"rerank top_k must be >= 1, got {top_k}")
        if isinstance(source, Reranking):
            rr = source if top_k is None else Reranking(source.encoder, source.reranker, top_k=top_k)
            where = "the given re-ranker"
        else:
            key = ("index" if source in (True, None, "index") else str(source), top_k)
            with self._lock:
                cached = self._rerankings.get(key)
                if cached is not None:
                    return cached
                if key[0] == "index":
                    folder = stored_reranker(self.store)
                    if folder is None:
                        raise ValueError(
                            f"index {self.location} records a re-ranker but its copy (reranker.json, "
                            f"reranker.safetensors) is missing; rebuild it: calibclip index "
                            f"{self._meta.get('root') or 'IMAGES_DIR'} --out {self.location} --rerank PATH"
                        )
                    if rec.get("sha256") and weights_sha256(folder) != rec["sha256"]:
                        raise ValueError(
                            f"index {self.location}: its re-ranker copy does not match the one its tokens were "
                            f"stored with; rebuild it: calibclip index {self._meta.get('root')} --out "
                            f"{self.location} --rerank PATH"
                        )
                    rr = create_reranking(self.encoder, folder, top_k=top_k)
                    where = f"the index's re-ranker ({rec.get('source')})"
                else:
                    rr = create_reranking(self.encoder, source, top_k=top_k)
                    where = f"re-ranker {source}"
        if rr.projection_id() != rec.get("projection"):
            raise ValueError(
                f"{where} projects image tokens differently from the re-ranker index {self.location} stores "
                f"tokens for ({rec.get('source')}); use the index's (--rerank without a value) or rebuild: "
                f"calibclip index {self._meta.get('root') or 'IMAGES_DIR'} --out {self.location} --rerank PATH"
            )
        if not isinstance(source, Reranking):
            with self._lock:
                self._rerankings[key] = rr
        return rr

    def rerank_tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored re-ranker image tokens ``[n, N, width]`` (float16) of ``ids``."""
        if not self.has_rerank:
            self.reranking()  # the clear error
        return self.store.tokens(RERANK_TOKENS, np.asarray(ids, dtype=np.int64))

    def explain_match(self, text: str, image_id: int, rerank: Any = True) -> Any:
        """The re-ranker's view of (``text``, indexed image ``image_id``) from the stored tokens (no image
        decoded): per query word its cross-attention over the image grid, and the cosine, match and
        fused scores (`calibclip.calibration.reranker.MatchExplanation`)."""
        rr = self.reranking(rerank)
        self._positions([int(image_id)])
        tokens = torch.from_numpy(self.rerank_tokens([int(image_id)])[0].astype(np.float32))
        pooled = torch.from_numpy(self.features("raw", [int(image_id)])[0])
        grid = tuple((self.reranker_info or {}).get("grid") or (0, 0))
        return rr.explain_stored(text, tokens, pooled, (int(grid[0]), int(grid[1])))

    def attach_combiner(self, path: str | os.PathLike) -> None:
        """Copy a Combiner checkpoint into the index; composed queries use it from now on."""
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"combiner checkpoint {src} does not exist (expected RUN_DIR/best.pt)")
        if self._encoder is not None or self._meta.get("model_spec"):
            from calibclip.composed import build_combining

            build_combining("combiner", src, encoder=self.encoder)  # refuse a checkpoint of another encoder now
        writer = open_store(self.location, writable=True, options=self._store_options())
        try:
            install_combiner(writer, src)
            meta = writer.meta()
        finally:
            writer.close()
        with self._lock:
            self._meta = meta
            self._combining = None

    def _store_options(self) -> dict[str, Any] | None:
        return getattr(self.store, "options", None)

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
                    f"image {image}: neither an image of this index (relative to {self.images_dir}) "
                    "nor an existing file"
                )
        if image_id is not None:
            names = ["raw", "calibrated"] if calibrate else ["raw"]
            if calibrate:
                self.calibrator()
            return {n: torch.from_numpy(self.features(n, [image_id])[0]) for n in names}, image_id
        from calibclip.data.images import load_image

        enc = self.encoder
        pixels = enc.preprocess(load_image(image))[None].to(enc.device, enc.dtype)  # type: ignore[arg-type]
        if calibrate:
            return {k: v[0].float().cpu() for k, v in self.calibrator().image_features(pixels).items()}, None
        return {"raw": enc.encode_image(pixels)[0].float().cpu()}, None

    def query(self, text: str | None = None, image: ImageQuery | None = None, calibrate: bool = False) -> Query:
        """Query vectors for text-only, image-only or composed (image + text) search."""
        if not text and image is None:
            raise ValueError("a search needs text, image or both")
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
        params: dict[str, Any] | None = None,
        query: Query | None = None,
        rerank: Any = None,
        rerank_top_k: int | None = None,
    ) -> list[SearchResult]:
        """Search by ``text``, ``image`` (indexed id, indexed or other path, bytes, PIL image) or both.

        Composed queries use the index's Combiner (else the normalised sum) and, with
        ``exclude_reference``, leave an indexed reference image out of the results.
        ``calibrate``: exact/ANN top-K by raw similarity, then CalibCLIP's fused score for those
        candidates (see docs/indexing-stores.md). ``ann``: auto or a kind of the store's backend
        (local: exact | ivf | hnsw); ``nprobe`` / ``ef_search`` / ``params``: per-call search parameters.
        ``query``: precomputed query vectors (e.g. from `query_from_features`) instead of ``text``/``image``.
        ``rerank``: re-score the top ``rerank_top_k`` (default: the re-ranker's ``top_k``) of that ranking
        (plain or calibrated) with the trained cross-modal re-ranker over the stored image tokens, in
        one batched forward (text queries only; with ``query``, ``text`` must still be given): True for the
        index's re-ranker, a folder or a `Reranking` (see `reranking`). Everything below keeps its order.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rr, rr_text = None, None
        if rerank is not None and rerank is not False:
            if image is not None or (query is not None and (query.composed or query.reference_id is not None)):
                raise ValueError("re-ranking applies to text queries (text->image), not to image or composed queries")
            if not text:
                raise ValueError("re-ranking needs the query text (text=...)")
            rr = self.reranking(rerank, rerank_top_k)
            if query is None and not calibrate:  # one text forward gives the query vector and its tokens
                pooled, x, pad = rr.text_inputs(text)
                query = Query(pooled[0].float().cpu(), None, None)
            else:
                _, x, pad = rr.text_inputs(text)
            rr_text = (x, pad)
        q = query if query is not None else self.query(text, image, calibrate)
        composed = bool(text) or q.composed
        exclude = q.reference_id if (q.reference_id is not None and composed and exclude_reference) else None
        want = k + (exclude is not None)
        cal = self.calibrator() if calibrate else None
        depth = max(want, int(cal.config.top_k) + (exclude is not None)) if cal is not None else want
        if rr is not None:
            depth = max(depth, int(rr.top_k))
        scores, ids = self._search_ids(
            normalize(q.raw), depth, ann, {"nprobe": nprobe, "ef_search": ef_search, **(params or {})}
        )
        scores, ids = scores[0], ids[0]
        keep = ids >= 0
        if exclude is not None:
            keep &= ids != exclude
        scores, ids = scores[keep], ids[keep]
        if cal is not None and len(ids):
            gallery = normalize(self.store.vectors("calibrated", ids))
            sim_cal = (gallery @ normalize(q.calibrated)[0]).numpy()  # type: ignore[arg-type]
            fused = np.asarray(cal.fuse(scores[None].astype(np.float64), sim_cal[None].astype(np.float64)))[0]
            order = np.argsort(-fused, kind="stable")
            reranked = np.arange(len(ids)) < min(int(cal.config.top_k), len(ids))  # scores are sorted by raw
            shown = np.where(reranked, fused, scores)
            scores, ids, ranking = shown[order], ids[order], fused[order]
        else:
            ranking = scores
        if rr is not None and rr_text is not None and len(ids):
            # the trained re-ranker re-scores the top-K of that ranking (its ranking scores are the dual
            # scores it fuses with, as in evaluation) in one batched forward over the stored tokens
            top = min(int(rr.top_k), len(ids))
            cand = torch.from_numpy(self.rerank_tokens(ids[:top]))[None]
            sim = torch.as_tensor(np.asarray(ranking[:top], dtype=np.float64))[None]
            fused_rr, _ = rr.rescore(sim, rr_text[0], rr_text[1], cand)
            fused_rr = fused_rr[0].cpu().numpy()
            order = np.argsort(-fused_rr, kind="stable")
            scores = np.concatenate([fused_rr[order], np.asarray(scores[top:], dtype=np.float64)])
            ids = np.concatenate([ids[:top][order], ids[top:]])
        scores, ids = scores[:k], ids[:k]
        recs = self.store.records(ids.tolist())
        return [
            SearchResult(int(i), str(self.images_dir / recs[int(i)][1]), float(s), r + 1, recs[int(i)][1])
            for r, (i, s) in enumerate(zip(ids, scores, strict=True))
        ]

    # --- serving helpers (batched queries, explanations, freshness; used by the web app) -----------
    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], calibrate: bool = False) -> dict[str, torch.Tensor]:
        """Query features ``{"raw": [B, D]}`` (plus ``"calibrated"``) of several texts in one forward.

        Args:
            texts: query texts.
            calibrate: also compute the CalibCLIP-calibrated features (needs calibrated vectors).

        Returns:
            Float32 CPU tensors, row ``i`` for ``texts[i]`` (what `encode_text` gives for it alone).
        """
        texts = list(texts)
        if not texts:
            raise ValueError("encode_texts needs at least one text")
        if calibrate:
            return {k: v.float().cpu() for k, v in self.calibrator().text_features(texts).items()}
        enc = self.encoder
        return {"raw": enc.encode_text(enc.tokenize(texts).to(enc.device)).float().cpu()}

    def query_from_features(
        self,
        text_features: dict[str, torch.Tensor] | None,
        image: ImageQuery | None = None,
        calibrate: bool = False,
    ) -> Query:
        """A `Query` from precomputed text features (one row of `encode_texts`, ``[D]``) and an optional
        image, combined like `query` does; pass it to ``search(query=...)``.

        Raises:
            ValueError: neither text features nor an image, or calibrated features missing.
        """
        if text_features is None and image is None:
            raise ValueError("a query needs text features, an image or both")
        if calibrate and text_features is not None and "calibrated" not in text_features:
            raise ValueError("calibrate=True needs calibrated text features (encode_texts(..., calibrate=True))")
        img, ref = self.encode_image(image, calibrate) if image is not None else (None, None)
        vec: dict[str, torch.Tensor]
        if text_features is not None and img is not None:
            fn = self.combining()
            vec = {n: fn(img[n][None], text_features[n][None])[0].float() for n in img}
        elif text_features is not None:
            vec = dict(text_features)
        else:
            assert img is not None
            vec = img
        return Query(
            vec["raw"],
            vec.get("calibrated") if calibrate else None,
            ref,
            composed=text_features is not None and img is not None,
        )

    def pixels(self, images: Sequence[ImageQuery]) -> torch.Tensor:
        """Preprocessed pixels ``[B, 3, H, W]`` of images (indexed ids, paths, bytes or PIL images) on the
        encoder's device and dtype, ready for the encoder or the `Calibrator`.

        Raises:
            KeyError: an id that is not in the index.
            calibclip.data.images.ImageError: a file that cannot be decoded.
        """
        from calibclip.data.images import load_image

        enc = self.encoder
        sources: list[Any] = [
            self.path_of(int(i)) if isinstance(i, (int, np.integer)) and not isinstance(i, bool) else i for i in images
        ]
        return torch.stack([enc.preprocess(load_image(s)) for s in sources]).to(enc.device, enc.dtype)

    @property
    def version(self) -> tuple[int, int]:
        """``(generation, version)`` of the commit this object reads (changes with every committed batch)."""
        return int(self._meta.get("generation", 0)), int(self._meta.get("version", 0))

    def is_stale(self) -> bool:
        """Whether the index on disk has changed since it was opened (another process committed a batch,
        compacted or rebuilt it); one small metadata read. Re-open it to see the change."""
        return (int(self.store.fresh("generation", 0)), int(self.store.fresh("version", 0))) != self.version


def default_workers() -> int:
    """Decoding processes: CPU cores - 1, between 0 and 4."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _create(spec: str | os.PathLike, device: str, precision: str) -> Encoder:
    from calibclip.models.registry import create_model

    return create_model(spec, device=device, precision=precision)
