"""Build or update an index from a folder: scan, plan (new / changed / deleted / unchanged), decode
in worker processes overlapped with encoding, commit atomically batch by batch.

Change detection: a file whose (size, mtime) match the index is unchanged; otherwise its SHA-256
is compared with the stored one (a touched but identical file only gets its mtime updated).
Files that failed before are retried only when their size or mtime changed.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from calibclip.data.loader import iter_image_batches
from calibclip.data.scan import ScannedFile, scan_images
from calibclip.index.stores import VectorStore, open_store
from calibclip.index.stores.base import SkippedRow, no_tokens_message
from calibclip.models.base import Encoder
from calibclip.utils import progress_bar

#: Compact the vector files (local store) when dead rows exceed this fraction of all rows.
COMPACT_FRACTION = 0.25
COMBINER_STEM = "combiner"
#: The token set holding the trained re-ranker's projected image tokens.
RERANK_TOKENS = "rerank"


@dataclass
class BuildReport:
    """What one `build_index` run did."""

    scanned: int
    added: int
    updated: int
    removed: int
    unchanged: int
    skipped_new: int
    count: int
    skipped: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_facts(path: str | os.PathLike) -> dict[str, Any] | tuple[str, str]:
    """What the record of a decoded file adds to its scan entry (``sha256``, ``width``, ``height``), or
    ``(reason, message)`` — ``missing`` / ``unreadable`` — when it vanished or became unreadable since
    it was decoded. Both engines call this, so a file deleted mid-run is the same skip in either."""
    try:
        digest = sha256_file(path)
    except FileNotFoundError:
        return "missing", f"{path}: deleted while the index was being built"
    except OSError as exc:
        return "unreadable", f"{path}: cannot read ({exc.strerror or exc})"
    w, h = oriented_size(path)
    return {"sha256": digest, "width": w, "height": h}


def file_record(f: ScannedFile) -> dict[str, Any] | tuple[str, int, int, str, str]:
    """The stored record of a decoded file (hash and header size read here), or its skipped row
    ``(relpath, size, mtime_ns, "missing" | "unreadable", message)`` when it vanished or became unreadable
    since the scan: one file deleted mid-run is a skip like any other, never the end of the run."""
    facts = file_facts(f.path)
    if isinstance(facts, tuple):
        return (f.relpath, f.size, f.mtime_ns, *facts)
    return {"path": f.relpath, "size": f.size, "mtime_ns": f.mtime_ns, **facts}


def drop_non_finite(
    records: list[dict[str, Any]], vectors: dict[str, np.ndarray]
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], list[tuple[str, int, int, str, str]]]:
    """Split off the images whose vectors (in any set) are not finite once stored as float16 (NaN, or too
    large for float16): they are skipped with reason ``non_finite`` instead of stopping the batch.

    Returns:
        The kept records and their vectors, and the skipped rows.
    """
    if not records or not vectors:
        return records, vectors, []
    ok = np.ones(len(records), dtype=bool)
    for arr in vectors.values():
        with np.errstate(over="ignore", invalid="ignore"):
            flat = np.asarray(arr, dtype=np.float32).reshape(len(records), -1)
            ok &= np.isfinite(flat.astype(np.float16)).all(axis=1)
    if ok.all():
        return records, vectors, []
    bad = [
        (
            r["path"],
            r["size"],
            r["mtime_ns"],
            "non_finite",
            "the model gave this image a vector with NaN or infinite values; it is left out of the index",
        )
        for r, good in zip(records, ok, strict=True)
        if not good
    ]
    return [r for r, good in zip(records, ok, strict=True) if good], {k: v[ok] for k, v in vectors.items()}, bad


def oriented_size(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """(width, height) after EXIF orientation, read from the header only (no pixel decoding).
    The pixels themselves always go through `calibclip.data.images.load_image`."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w
            return int(w), int(h)
    except Exception:  # the decoder already accepted the file; sizes are informational only
        return None, None


def install_combiner(store: VectorStore, path: str | os.PathLike) -> str:
    """Copy a Combiner checkpoint into the store (keeping its suffix: .pt or .safetensors)."""
    src = Path(path)
    name = COMBINER_STEM + src.suffix
    store.put_file(name, src)
    old = (store.get("combiner") or {}).get("file")
    store.set_meta({"combiner": {"source": str(src.resolve()), "file": name}})
    if old and old != name:
        store.delete_file(old)
    return name


def model_identity(encoder: Encoder, spec: str | None) -> dict[str, Any]:
    """What the index records about the encoder (checked on every open/update)."""
    return {
        "model": encoder.name,
        "model_spec": spec,
        "fingerprint": encoder.fingerprint(),
        "model_config": encoder.config(),
        "precision": encoder.precision,
    }


def check_model(store: VectorStore, encoder: Encoder) -> None:
    """Refuse an encoder whose fingerprint differs from the one the index was built with."""
    want, got = store.get("fingerprint"), encoder.fingerprint()
    if want is not None and want != got:
        raise ValueError(
            f"index {store.spec} was built with model {store.get('model')!r} (fingerprint {want}) but the "
            f"given model is {encoder.name!r} (fingerprint {got}); features from different models are not comparable. "
            "Use the index's model (model=None), or build a new index at another location."
        )
    dim = store.get("dim")
    if dim is not None and int(dim) != int(encoder.embed_dim):
        raise ValueError(
            f"index {store.spec} holds {dim}-d vectors but model {encoder.name!r} gives "
            f"{encoder.embed_dim}-d ones; use the index's model or another location"
        )


def _feature_fn(
    encoder: Encoder,
    calibrate: bool,
    calibration: dict[str, Any] | None,
    method: str | None,
    reranking: Any = None,
) -> tuple[Callable[[torch.Tensor], dict[str, torch.Tensor]], dict[str, Any] | None]:
    """What a batch of pixels is stored as: ``raw`` (+ ``calibrated``) vectors, and with a ``reranking``
    the re-ranker's projected image tokens (`RERANK_TOKENS`), from the same image forward where it can."""
    if not calibrate:
        if reranking is None:
            return (lambda px: {"raw": encoder.encode_image(px)}), None

        def plain(px: torch.Tensor) -> dict[str, torch.Tensor]:
            view = encoder.image_tokens(px)
            return {"raw": view.pooled, RERANK_TOKENS: reranking.project_view(view.tokens)}

        return plain, None
    from calibclip.calibration.calibrator import Calibrator
    from calibclip.calibration.methods import create_calibrator, method_record

    cal = create_calibrator(encoder, method, settings=calibration)
    record = method_record(cal, method)
    if reranking is None:
        return cal.image_features, record
    if isinstance(cal, Calibrator) and type(cal).image_features is Calibrator.image_features:

        def calibrated(px: torch.Tensor) -> dict[str, torch.Tensor]:
            view, result = cal.image_calibration(px)
            return {
                "raw": view.pooled,
                "calibrated": result.calibrated,
                RERANK_TOKENS: reranking.project_view(view.tokens),
            }

        return calibrated, record
    return (lambda px: {**cal.image_features(px), RERANK_TOKENS: reranking.image_tokens(px)}), record


def reranker_record(reranking: Any, source: str | os.PathLike) -> tuple[dict[str, Any], list[int], tuple[int, int]]:
    """What an index records about the re-ranker it stores tokens for (``reranker`` metadata), the
    per-image token shape ``[N, width]`` and the token grid, found with one forward of a blank image."""
    from calibclip.calibration.reranker import reranker_folder, weights_sha256

    enc = reranking.encoder
    px = enc.preprocess(Image.new("RGB", (64, 64)))[None].to(enc.device, enc.dtype)
    view = enc.image_tokens(px)
    shape = [int(x) for x in reranking.project_view(view.tokens).shape[1:]]
    grid = (int(view.grid[0]), int(view.grid[1]))
    cfg = reranking.reranker.config
    folder = reranker_folder(source).resolve()
    record = {
        "source": str(folder),
        "sha256": weights_sha256(folder),
        "config_id": reranking.config_id(),
        "projection": reranking.projection_id(),
        "token_set": RERANK_TOKENS,
        "tokens": shape,
        "grid": list(grid),
        "top_k": int(cfg.top_k),
        "config": cfg.to_dict(),
    }
    return record, shape, grid


def install_reranker(store: VectorStore, source: str | os.PathLike) -> None:
    """Copy a re-ranker's two files into the store (``reranker.json``, ``reranker.safetensors``)."""
    from calibclip.calibration.reranker import CONFIG_FILE, WEIGHTS_FILE, reranker_folder

    folder = reranker_folder(source)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        store.put_file(name, folder / name)


def stored_reranker(store: VectorStore) -> Path | None:
    """The folder of the re-ranker copy an index holds (None when it has none)."""
    from calibclip.calibration.reranker import CONFIG_FILE, WEIGHTS_FILE

    cfg, weights = store.file_path(CONFIG_FILE), store.file_path(WEIGHTS_FILE)
    return cfg.parent if cfg is not None and weights is not None and cfg.parent == weights.parent else None


def resolve_build_reranker(
    store: VectorStore, encoder: Encoder, rerank: str | os.PathLike | bool | None, existing: bool
) -> tuple[Any, Path | None]:
    """The `Reranking` a build stores tokens for and its folder: ``rerank`` None keeps the index's own
    (none for a new index), False drops it, True or ``"packaged"`` is the encoder's packaged re-ranker,
    else a re-ranker folder.

    Raises:
        ValueError: no packaged re-ranker, one of another encoder, a backend without token sets, or an
            index whose recorded re-ranker files are missing.
    """
    from calibclip.calibration.reranker import create_reranking, packaged_reranker_path

    if rerank is False or (rerank is None and not (existing and store.get("reranker"))):
        return None, None
    if rerank is None:
        source = stored_reranker(store)
        if source is None:
            raise ValueError(
                f"index {store.spec} records a re-ranker but its copy (reranker.json, reranker.safetensors) is "
                "missing; re-run with --rerank PATH"
            )
    elif rerank is True or str(rerank) == "packaged":
        found = packaged_reranker_path(encoder.name)
        if found is None:
            raise ValueError(
                f"no re-ranker ships with {encoder.name}; train one (calibclip train with "
                "training.target: reranker) and pass its folder: --rerank PATH"
            )
        source = found
    else:
        source = Path(rerank)
    if not store.supports_tokens:
        raise ValueError(no_tokens_message(store.scheme))
    return create_reranking(encoder, source), source


@torch.inference_mode()
def build_index(
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    encoder: Encoder,
    model_spec: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    calibrate: bool | None = None,
    calibration: dict[str, Any] | None = None,
    combiner: str | os.PathLike | None = None,
    progress: bool = True,
    calibration_method: str | None = None,
    store_options: Mapping[str, Any] | None = None,
    engine: str = "local",
    engine_options: Mapping[str, Any] | None = None,
    rerank: str | os.PathLike | bool | None = None,
) -> BuildReport:
    """Create or incrementally update the index at ``out_dir`` from ``images_dir``.

    Args:
        images_dir: folder of images (walked recursively).
        out_dir: store spec: a folder (local format) or ``SCHEME:LOCATION`` (e.g. ``milvus:PATH.db``).
        encoder: the image encoder.
        model_spec: how to re-create the encoder later (recorded in the index).
        batch_size: images per encoded and committed batch.
        workers: decoding processes of the local engine (0 = in-process).
        calibrate: also store calibrated vectors; None keeps what the index has (none for a new
            one); switching it on/off re-encodes everything.
        calibration: overrides of the calibration method's settings (`CalibrationConfig` fields).
        combiner: a Combiner checkpoint copied into the index.
        progress: show a progress bar.
        calibration_method: a registered calibration method (default: the recorded one, else ``calibclip``).
        store_options: backend options (Milvus: ``token``).
        engine: ``local`` (a process pool here) or ``ray`` (Ray Data; see `calibclip.index.ray_engine`).
        engine_options: Ray engine options (``address``, ``num_workers``, ``gpus_per_worker``, ``num_cpus``).
        rerank: also store the trained re-ranker's projected fp16 image tokens (`RERANK_TOKENS`): a
            re-ranker folder, True / ``"packaged"`` for the encoder's packaged one; None keeps what the
            index has (its recorded re-ranker, or none); False drops them. A re-ranker whose image
            projection differs from the recorded one re-encodes everything. Local store only.

    Returns:
        What the run did.

    Raises:
        ValueError: bad parameters, another model than the index's, a location that is not an index.
        FileNotFoundError: a missing ``images_dir`` or ``combiner``.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use {' or '.join(ENGINES)}")
    images_dir = Path(images_dir).resolve()
    scan = scan_images(images_dir)
    if combiner is not None:
        if not Path(combiner).is_file():
            raise FileNotFoundError(f"combiner checkpoint {combiner} does not exist (expected RUN_DIR/best.pt)")
        from calibclip.composed import build_combining

        build_combining("combiner", Path(combiner), encoder=encoder)  # a checkpoint of another encoder is refused now
    if rerank is not None and rerank is not False:
        from calibclip.index.stores import get_store_class, parse_spec

        scheme = parse_spec(out_dir)[0]
        if not get_store_class(scheme).supports_tokens:  # said before the store is created
            raise ValueError(no_tokens_message(scheme))
    store = open_store(out_dir, writable=True, options=store_options)
    try:
        existing = store.get("format") is not None
        if existing:
            check_model(store, encoder)
        had_cal = existing and "calibrated" in store.vector_sets
        calibrate = had_cal if calibrate is None else bool(calibrate)
        if calibration_method and not calibrate:
            raise ValueError(f"calibration_method={calibration_method!r} needs calibrate=True (calibrated vectors)")
        if calibrate and had_cal:
            recorded = store.get("calibration") or {}
            calibration = recorded.get("config") if calibration is None else calibration
            calibration_method = calibration_method or recorded.get("method")
        reranking, rr_source = resolve_build_reranker(store, encoder, rerank, existing)
        if reranking is not None and engine == "ray":
            raise ValueError("re-ranker tokens (--rerank) are not supported with --engine ray yet; use --engine local")
        fn, cal_meta = _feature_fn(encoder, calibrate, calibration, calibration_method, reranking)
        sets = ["raw", "calibrated"] if calibrate else ["raw"]
        rr_meta, token_sets = None, {}
        if reranking is not None:
            rr_meta, shape, _ = reranker_record(reranking, rr_source)  # type: ignore[arg-type]
            token_sets = {RERANK_TOKENS: shape}
            if rerank is None:  # the index's own copy: keep recording where it came from
                rr_meta["source"] = (store.get("reranker") or {}).get("source", rr_meta["source"])
        identity = {
            **model_identity(encoder, model_spec),
            "root": str(images_dir),
            "calibration": cal_meta,
            "reranker": rr_meta,
            "token_sets": token_sets,
        }
        old_rr = (store.get("reranker") or {}) if existing else {}
        rr_changed = (rr_meta or {}).get("projection") != old_rr.get("projection") or token_sets != {
            k: list(v) for k, v in store.token_sets().items()
        }
        if (
            not existing
            or sets != store.vector_sets
            or (cal_meta and cal_meta != store.get("calibration"))
            or (existing and rr_changed)
        ):
            store.initialise(int(encoder.embed_dim), sets, identity)
        else:
            store.set_meta(identity)
        if rr_source is not None and rerank is not None:
            install_reranker(store, rr_source)
        elif reranking is None and old_rr:
            from calibclip.calibration.reranker import CONFIG_FILE, WEIGHTS_FILE

            store.delete_file(CONFIG_FILE)
            store.delete_file(WEIGHTS_FILE)

        # --- plan -------------------------------------------------------------------------------
        state = store.images_state()
        skipped_state = store.skipped_state()
        present = {f.relpath for f in scan.files} | set(scan.problems)
        removed = [p for p in list(state) + list(skipped_state) if p not in present]
        todo: list[ScannedFile] = []
        touched: list[tuple[str, int, int]] = []
        unchanged = 0
        for f in scan.files:
            if f.relpath in state:
                size, mtime, digest, _ = state[f.relpath]
                if (size, mtime) == (f.size, f.mtime_ns):
                    unchanged += 1
                    continue
                if sha256_file(f.path) == digest:
                    touched.append((f.relpath, f.size, f.mtime_ns))
                    unchanged += 1
                    continue
            elif skipped_state.get(f.relpath) == (f.size, f.mtime_ns):
                continue  # still the file that was skipped: still skipped (not "unchanged": it is no image)
            todo.append(f)
        problems = [
            (rel, None, None, reason, msg) for rel, (reason, msg) in scan.problems.items() if rel not in skipped_state
        ]
        store.commit_batch({}, [], skipped=problems, removed=removed)
        if touched:
            store.touch_images(touched)

        # --- encode -----------------------------------------------------------------------------
        added = updated = skipped_new = 0
        bar = progress_bar(total=len(todo), desc="indexing", unit="img", disable=not progress)
        if engine == "ray":
            from calibclip.index.ray_engine import ray_batches

            batches = ray_batches(
                todo, encoder, calibrate, calibration, calibration_method, batch_size, dict(engine_options or {})
            )
        else:
            batches = local_batches(todo, encoder, fn, [*sets, *token_sets], batch_size, workers)
        for records, skipped, vectors in batches:
            records, vectors, bad = drop_non_finite(records, vectors)
            skipped = [*skipped, *bad]
            if token_sets:
                tokens = {k: vectors.pop(k) for k in token_sets if k in vectors}
                store.commit_batch(vectors, records, skipped, tokens=tokens)
            else:
                store.commit_batch(vectors, records, skipped)
            updated += sum(r["path"] in state for r in records)
            added += sum(r["path"] not in state for r in records)
            skipped_new += len(skipped)
            bar.update(len(records) + len(skipped))
            bar.set_postfix(skipped=skipped_new, refresh=False)
        bar.close()

        store.maintain()
        if combiner is None and not (store.get("combiner") or {}).get("file"):
            from calibclip.composed import packaged_combiner_for

            combiner = packaged_combiner_for(encoder)  # the encoder's packaged Combiner, if it has one
        if combiner is not None:
            install_combiner(store, combiner)
        return BuildReport(
            scanned=len(scan.files) + len(scan.problems),
            added=added,
            updated=updated,
            removed=sum(p in state for p in removed),
            unchanged=unchanged,
            skipped_new=skipped_new + len(problems),
            count=store.count(),
            skipped=store.skipped_count(),
            seconds=round(time.perf_counter() - t0, 3),
        )
    finally:
        store.close()


#: Embedding engines `build_index` accepts.
ENGINES = ("local", "ray")

#: One committed unit: image records, skipped files, vectors per set.
Batch = tuple[list[dict[str, Any]], list[SkippedRow], dict[str, np.ndarray]]


def local_batches(
    todo: Sequence[ScannedFile],
    encoder: Encoder,
    fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    sets: Sequence[str],
    batch_size: int,
    workers: int,
) -> Iterator[Batch]:
    """The local engine: decode in ``workers`` processes (in order), encode here, batch by batch.

    While decoding workers run, the encoder uses at most ``CPU cores - workers`` intra-op threads (at least
    1): on a small machine an OpenMP team that also competes with the decoders for the same cores spends
    its time waiting at barriers (2 threads next to 1 decoder on 2 cores: several times slower)."""
    threads = torch.get_num_threads()
    cap = max(1, (os.cpu_count() or 1) - workers) if workers else threads
    if cap < threads:
        torch.set_num_threads(cap)
    try:
        for batch in iter_image_batches([f.path for f in todo], encoder.preprocess, batch_size, workers):
            skipped: list[SkippedRow] = [
                (todo[i].relpath, todo[i].size, todo[i].mtime_ns, reason, msg)
                for i, (reason, msg) in batch.errors.items()
            ]
            records, keep = [], []
            for j, i in enumerate(batch.indices):
                rec = file_record(todo[i])
                if isinstance(rec, tuple):  # the file vanished (or became unreadable) after decoding
                    skipped.append(rec)
                else:
                    records.append(rec)
                    keep.append(j)
            vectors: dict[str, np.ndarray] = {}
            if batch.pixels is not None and keep:
                pixels = batch.pixels if len(keep) == len(batch.pixels) else batch.pixels[keep]  # no copy if all kept
                out = fn(pixels.to(encoder.device, encoder.dtype))
                vectors = {name: _numpy(out[name]) for name in sets}
            yield records, skipped, vectors
    finally:
        if cap < threads:
            torch.set_num_threads(threads)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """float32 numpy of a vector batch; float16 tensors (re-ranker tokens) stay float16."""
    t = t.detach().cpu()
    return t.numpy() if t.dtype == torch.float16 else t.float().numpy()
