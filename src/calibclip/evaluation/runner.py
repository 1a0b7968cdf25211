"""One evaluation run as the CLI and scripts do it: build the encoder for the dataset family,
dispatch to the text->image evaluator or the composed-retrieval protocol, time it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from calibclip.data.cache import FeatureCache
from calibclip.data.registry import dataset_names, get_dataset
from calibclip.evaluation.evaluator import SHARD_SIZE, evaluate_retrieval
from calibclip.models.base import Encoder


def _listing(names: tuple[str, ...]) -> str:
    """``a, b and c``."""
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1]))) if names else "none"


def default_split(dataset: str) -> str:
    """The split evaluated when none is given (the dataset table's ``default_split``)."""
    return get_dataset(dataset).default_split


def default_combining_name(encoder: Encoder, combiner: str | None) -> str:
    """Composed retrieval without ``--combining``: ``combiner`` with a checkpoint or a packaged
    Combiner for the encoder, else ``sum`` (the normalised sum)."""
    from calibclip.composed import packaged_combiner_for

    return "combiner" if combiner or packaged_combiner_for(encoder) is not None else "sum"


def load_encoder(
    model: str,
    task: str = "captions",
    device: str = "auto",
    precision: str = "fp32",
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


def run_evaluation(
    dataset: str,
    data_root: str | Path,
    config: dict[str, Any],
    model: str | None = None,
    split: str | None = None,
    encoder: Encoder | None = None,
    calibrate: bool = False,
    combiner: str | None = None,
    combining: str | None = None,
    submission_dir: str | Path | None = None,
    progress: bool = True,
    calibration_method: str | None = None,
    rerank: str | None = None,
    rerank_top_k: int | None = None,
) -> dict[str, Any]:
    """Evaluate and return ``{"dataset", "split", "model", "metrics", "calibrate", "timing"}``.

    ``config``: from `calibclip.evaluation.config.load_config` (model, evaluation, calibration).
    ``encoder``: reuse an already built encoder (batch evaluation); otherwise built from ``model``.
    ``calibration_method``: a registered calibration method (default ``calibclip``) used with ``calibrate``.
    ``rerank``: re-rank each query's top-K with the trained re-ranker (``"packaged"``: the one shipped with
    the encoder, else a re-ranker folder); ``rerank_top_k`` overrides its K.
    """
    spec = get_dataset(dataset)
    name, task = spec.name, spec.task
    model_cfg, eval_cfg = config["model"], config["evaluation"]
    model = str(model or model_cfg.get("name") or "starter")
    split = split or eval_cfg.get("split") or spec.default_split
    if calibration_method and not calibrate:
        raise ValueError("a calibration method applies with calibration on (--calibrate)")
    if task == "composed" and calibrate:
        raise ValueError("--calibrate applies to text->image retrieval; composed retrieval uses --combining")
    if task == "composed" and rerank:
        raise ValueError("--rerank applies to text->image retrieval, not composed retrieval")
    if task != "composed" and (combiner or combining):
        raise ValueError(f"--combiner/--combining apply to {_listing(dataset_names('composed'))}, not {name}")
    # Read the annotations before the model so that a wrong split or data root fails at once.
    data = spec.load(data_root, split) if task != "composed" else None
    t0 = time.perf_counter()
    if encoder is None:
        encoder = load_encoder(
            model,
            task,
            model_cfg.get("device", "auto"),
            model_cfg.get("precision", "fp32"),
            model_cfg.get("clip_image_size"),
        )
    t_model = time.perf_counter() - t0
    cache = FeatureCache(enabled=bool(eval_cfg.get("cache", True)), shard_size=SHARD_SIZE)
    batch_size, workers = int(eval_cfg.get("batch_size", 64)), int(eval_cfg.get("workers", 0))
    timing: dict[str, float] = {"model_s": t_model}
    t1 = time.perf_counter()
    if task == "composed":
        from calibclip.composed import evaluate_composed

        metrics = evaluate_composed(
            encoder,
            name,
            data_root,
            split,
            combining=combining or default_combining_name(encoder, combiner),
            combiner=combiner,
            cache=cache,
            batch_size=batch_size,
            workers=workers,
            submission_dir=Path(submission_dir) if submission_dir else None,
            progress=progress,
        )
    else:
        calibrator = None
        if calibrate:
            from calibclip.calibration.methods import create_calibrator

            calibrator = create_calibrator(encoder, calibration_method, settings=config.get("calibration"))
        reranking = None
        if rerank:
            from calibclip.calibration.reranker import create_reranking

            reranking = create_reranking(encoder, rerank, top_k=rerank_top_k)
        metrics = evaluate_retrieval(
            encoder,
            data,  # type: ignore[arg-type]
            batch_size=batch_size,
            workers=workers,
            cache=cache,
            calibrator=calibrator,
            progress=progress,
            timings=timing,
            reranking=reranking,
        )
    timing["total_s"] = time.perf_counter() - t1
    metrics = {k: round(float(v), 6) for k, v in metrics.items()}  # drop float noise (26.640000000000004)
    return {
        "dataset": name,
        "split": split,
        "model": model,
        "metrics": metrics,
        "calibrate": calibrate,
        "rerank": str(rerank) if rerank else None,
        "timing": timing,
    }
