"""Build or update an index from a folder: scan, plan (new / changed / deleted / unchanged), decode
in worker processes overlapped with encoding, commit atomically batch by batch.

Change detection: a file whose (size, mtime) match the index is unchanged; otherwise its SHA-256
is compared with the stored one (a touched but identical file only gets its mtime updated).
Files that failed before are retried only when their size or mtime changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from calibclip.data.loader import iter_image_batches
from calibclip.data.scan import ScannedFile, scan_images
from calibclip.index.storage import Storage, is_index_dir
from calibclip.models.base import Encoder
from calibclip.utils import progress_bar

#: Compact the vector files when dead rows exceed this fraction of all rows.
COMPACT_FRACTION = 0.25
COMBINER_STEM = "combiner"


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


def install_combiner(storage: Storage, path: str | os.PathLike) -> Path:
    """Copy a Combiner checkpoint into the index (keeping its suffix: .pt or .safetensors) atomically."""
    src = Path(path)
    dst = storage.directory / (COMBINER_STEM + src.suffix)
    shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
    os.replace(dst.with_name(dst.name + ".tmp"), dst)
    old = (storage.get("combiner") or {}).get("file")
    storage.set_meta({"combiner": {"source": str(src.resolve()), "file": dst.name}})
    if old and old != dst.name:
        (storage.directory / old).unlink(missing_ok=True)
    return dst


def model_identity(encoder: Encoder, spec: str | None) -> dict[str, Any]:
    """What the index records about the encoder (checked on every open/update)."""
    return {
        "model": encoder.name, "model_spec": spec, "fingerprint": encoder.fingerprint(),
        "model_config": encoder.config(), "precision": encoder.precision,
    }


def check_model(storage: Storage, encoder: Encoder) -> None:
    """Refuse an encoder whose fingerprint differs from the one the index was built with."""
    want, got = storage.get("fingerprint"), encoder.fingerprint()
    if want is not None and want != got:
        raise ValueError(
            f"index {storage.directory} was built with model {storage.get('model')!r} (fingerprint {want}) but the "
            f"given model is {encoder.name!r} (fingerprint {got}); features from different models are not comparable. "
            "Use the index's model (omit --model), or build a new index with --out pointing elsewhere."
        )


def _feature_fn(encoder: Encoder, calibrate: bool, calibration: dict[str, Any] | None, method: str | None) -> tuple[
    Callable[[torch.Tensor], dict[str, torch.Tensor]], dict[str, Any] | None
]:
    if not calibrate:
        return (lambda px: {"raw": encoder.encode_image(px)}), None
    from calibclip.calibration.methods import create_calibrator, method_record

    cal = create_calibrator(encoder, method, settings=calibration)
    return cal.image_features, method_record(cal, method)


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
) -> BuildReport:
    """Create or incrementally update the index at ``out_dir`` from ``images_dir``.

    ``calibrate=None`` keeps what the index already has (no calibrated vectors for a new index);
    switching it on/off re-encodes everything. ``calibration`` overrides `CalibrationConfig` fields;
    ``calibration_method`` names a registered calibration method (default: the recorded one, else
    ``calibclip``).
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    images_dir = Path(images_dir).resolve()
    scan = scan_images(images_dir)
    if combiner is not None:
        if not Path(combiner).is_file():
            raise FileNotFoundError(f"combiner checkpoint {combiner} does not exist (expected RUN_DIR/best.pt)")
        from calibclip.composed import build_combining

        build_combining("combiner", combiner, encoder=encoder)  # a checkpoint of another encoder is refused now
    out = Path(out_dir)
    if out.exists() and not is_index_dir(out) and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an index; give a new folder (or an existing index to update)")
    storage = Storage(out_dir, writable=True)
    try:
        existing = storage.get("format") is not None
        if existing:
            check_model(storage, encoder)
        had_cal = existing and "calibrated" in storage.vector_sets
        calibrate = had_cal if calibrate is None else bool(calibrate)
        if calibration_method and not calibrate:
            raise ValueError(f"calibration_method={calibration_method!r} needs calibrate=True (calibrated vectors)")
        if calibrate and had_cal:
            recorded = storage.get("calibration") or {}
            calibration = recorded.get("config") if calibration is None else calibration
            calibration_method = calibration_method or recorded.get("method")
        fn, cal_meta = _feature_fn(encoder, calibrate, calibration, calibration_method)
        sets = ["raw", "calibrated"] if calibrate else ["raw"]
        identity = {**model_identity(encoder, model_spec), "root": str(images_dir), "calibration": cal_meta}
        if not existing or sets != storage.vector_sets or (cal_meta and cal_meta != storage.get("calibration")):
            storage.initialise(int(encoder.embed_dim), sets, identity)
        else:
            storage.set_meta(identity)

        # --- plan -------------------------------------------------------------------------------
        state = storage.images_state()
        skipped_state = storage.skipped_state()
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
                unchanged += 1
                continue
            todo.append(f)
        problems = [(rel, None, None, reason, msg) for rel, (reason, msg) in scan.problems.items()
                    if rel not in skipped_state]
        storage.commit_batch({}, [], skipped=problems, removed=removed)
        if touched:
            storage.touch_images(touched)

        # --- encode -----------------------------------------------------------------------------
        added = updated = skipped_new = 0
        bar = progress_bar(total=len(todo), desc="indexing", unit="img", disable=not progress)
        for batch in iter_image_batches([f.path for f in todo], encoder.preprocess, batch_size, workers):
            records = []
            for i in batch.indices:
                f = todo[i]
                w, h = oriented_size(f.path)
                records.append({"path": f.relpath, "size": f.size, "mtime_ns": f.mtime_ns,
                                "sha256": sha256_file(f.path), "width": w, "height": h})
            skipped = [(todo[i].relpath, todo[i].size, todo[i].mtime_ns, reason, msg)
                       for i, (reason, msg) in batch.errors.items()]
            vectors: dict[str, np.ndarray] = {}
            if batch.pixels is not None:
                out = fn(batch.pixels.to(encoder.device, encoder.dtype))
                vectors = {name: out[name].float().cpu().numpy() for name in sets}
            storage.commit_batch(vectors, records, skipped)
            updated += sum(r["path"] in state for r in records)
            added += sum(r["path"] not in state for r in records)
            skipped_new += len(skipped)
            bar.update(len(batch.indices) + len(batch.errors))
            bar.set_postfix(skipped=skipped_new, refresh=False)
        bar.close()

        count = storage.count()
        if storage.rows - count > COMPACT_FRACTION * max(storage.rows, 1):
            storage.compact()
        if combiner is not None:
            install_combiner(storage, combiner)
        return BuildReport(
            scanned=len(scan.files) + len(scan.problems), added=added, updated=updated,
            removed=sum(p in state for p in removed),
            unchanged=unchanged, skipped_new=skipped_new + len(problems), count=count,
            skipped=storage.skipped_count(), seconds=round(time.perf_counter() - t0, 3),
        )
    finally:
        storage.close()
