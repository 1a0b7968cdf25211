"""One evaluation run as the CLI and scripts do it: build the encoder for the dataset family,
dispatch to the text->image evaluator or the composed-retrieval protocol, time it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from calibclip.data.cache import FeatureCache
from calibclip.datasets import canonical_dataset, dataset_task, load_dataset
from calibclip.evaluation.evaluator import SHARD_SIZE, evaluate_retrieval
from calibclip.models.base import Encoder

#: Split used when none is given (FashionIQ/CIRR test targets are not public).
DEFAULT_SPLIT = {"fashioniq": "val", "cirr": "val", "pseudo-cir": "dev"}


def default_split(dataset: str) -> str:
    return DEFAULT_SPLIT.get(canonical_dataset(dataset), "test")


def default_combining_name(encoder: Encoder, combiner: str | None) -> str:
    """Composed retrieval without ``--combining``: ``combiner`` with a checkpoint or a packaged
    Combiner for the encoder, else ``sum`` (the normalised sum)."""
    from calibclip.composed import packaged_combiner_for

    return "combiner" if combiner or packaged_combiner_for(encoder) is not None else "sum"


def load_encoder(
    model: str, task: str = "captions", device: str = "auto", precision: str = "fp32",
    clip_image_size: tuple[int, int] | list[int] | None = None,
) -> Encoder:
    """`create_model` for a task. For person retrieval with ``clip_image_size`` (e.g. 384x128), a
    CLIP model is rebuilt at that input size (interpolated position embeddings; the ``reid``
    direct-resize transform follows from the non-square size); other encoders keep their own."""
    from calibclip.models.registry import create_model

    encoder = create_model(model, device=device, precision=precision)
    if task == "person" and clip_image_size and encoder.config().get("arch") == "CLIP":
        size = [int(s) for s in clip_image_size]
        if list(encoder.config().get("image_size", [])) != size:
            encoder = create_model(model, device=device, precision=precision, image_size=tuple(size))
    return encoder


def make_calibrator(encoder: Encoder, settings: dict[str, Any] | None) -> Any:
    """A `Calibrator` with the encoder's defaults overridden by a config's ``calibration:`` section."""
    from calibclip.calibration import CalibrationConfig, Calibrator

    base = CalibrationConfig.default_for(encoder.name)
    return Calibrator(encoder, CalibrationConfig.from_dict(settings or {}, base=base))


def run_evaluation(
    dataset: str, data_root: str | Path, config: dict[str, Any], model: str | None = None, split: str | None = None,
    encoder: Encoder | None = None, calibrate: bool = False, combiner: str | None = None,
    combining: str | None = None, submission_dir: str | Path | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Evaluate and return ``{"dataset", "split", "model", "metrics", "calibrate", "timing"}``.

    ``config``: from `calibclip.evaluation.config.load_config` (model, evaluation, calibration).
    ``encoder``: reuse an already built encoder (batch evaluation); otherwise built from ``model``.
    """
    name = canonical_dataset(dataset)
    task = dataset_task(name)
    model_cfg, eval_cfg = config["model"], config["evaluation"]
    model = str(model or model_cfg.get("name") or "starter")
    split = split or eval_cfg.get("split") or default_split(name)
    if task == "composed" and calibrate:
        raise ValueError("--calibrate applies to text->image retrieval; composed retrieval uses --combining")
    if task != "composed" and (combiner or combining):
        raise ValueError(f"--combiner/--combining apply to fashioniq, cirr, css and pseudo-cir, not {name}")
    t0 = time.perf_counter()
    if encoder is None:
        encoder = load_encoder(model, task, model_cfg.get("device", "auto"), model_cfg.get("precision", "fp32"),
                               model_cfg.get("clip_image_size"))
    t_model = time.perf_counter() - t0
    cache = FeatureCache(enabled=bool(eval_cfg.get("cache", True)), shard_size=SHARD_SIZE)
    batch_size, workers = int(eval_cfg.get("batch_size", 64)), int(eval_cfg.get("workers", 0))
    timing: dict[str, float] = {"model_s": t_model}
    t1 = time.perf_counter()
    if task == "composed":
        from calibclip.composed import evaluate_composed

        metrics = evaluate_composed(
            encoder, name, data_root, split, combining=combining or default_combining_name(encoder, combiner),
            combiner=combiner, cache=cache, batch_size=batch_size, workers=workers,
            submission_dir=Path(submission_dir) if submission_dir else None, progress=progress,
        )
    else:
        data = load_dataset(name, data_root, split)
        calibrator = make_calibrator(encoder, config.get("calibration")) if calibrate else None
        metrics = evaluate_retrieval(encoder, data, batch_size=batch_size, workers=workers, cache=cache,
                                     calibrator=calibrator, progress=progress, timings=timing)
    timing["total_s"] = time.perf_counter() - t1
    metrics = {k: round(float(v), 6) for k, v in metrics.items()}  # drop float noise (26.640000000000004)
    return {"dataset": name, "split": split, "model": model, "metrics": metrics, "calibrate": calibrate,
            "timing": timing}
