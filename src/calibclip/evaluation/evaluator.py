"""Evaluate an encoder on a `RetrievalDataset`: features (through the one `FeatureCache`),
cosine similarities, optional CalibCLIP re-ranking, and the metrics of the dataset's family."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibclip.data.cache import FeatureCache
from calibclip.data.records import RetrievalDataset
from calibclip.evaluation.metrics import caption_metrics, ground_truth_metrics, retrieval_metrics
from calibclip.models.base import Encoder

#: Query rows fused at once when re-ranking with a calibrator (bounds memory).
FUSE_CHUNK = 1024
#: Feature-cache shard size of evaluation runs: the progress bar advances and a killed run resumes
#: at this granularity.
SHARD_SIZE = 256


def dataset_features(
    encoder: Encoder,
    dataset: RetrievalDataset,
    batch_size: int = 64,
    workers: int = 0,
    cache: FeatureCache | None = None,
    calibrator: Any | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(text_features, image_features)``, each ``{"raw": [N, D]}`` (plus ``"calibrated"`` with
    a calibrator), cached per (model, preprocessing, dataset, split, calibration settings)."""
    cache = cache if cache is not None else FeatureCache(enabled=False, shard_size=SHARD_SIZE)
    tags: dict[str, Any] = {
        "dataset": dataset.name,
        "split": dataset.split,
        "preprocess": encoder.preprocess.describe(),
    }
    names: tuple[str, ...]
    if calibrator is not None:
        img_fn, txt_fn, names = calibrator.image_features, calibrator.text_features, ("raw", "calibrated")
        tags["variant"] = calibrator.config_id()
    else:
        img_fn, txt_fn, names = None, None, ("raw",)
    images = cache.image_features(
        encoder,
        dataset.images,
        fn=img_fn,
        names=names,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        **tags,
    )
    texts = cache.text_features(
        encoder, dataset.captions, fn=txt_fn, names=names, batch_size=max(batch_size, 128), progress=progress, **tags
    )
    return texts, images


def cosine_similarity(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[Q, G]`` cosine similarities (float32) of two feature matrices."""
    q = F.normalize(torch.as_tensor(queries).float(), dim=-1)
    g = F.normalize(torch.as_tensor(gallery).float(), dim=-1)
    return q @ g.T


def compute_similarity(
    query_features: torch.Tensor, gallery_features: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """``[Q, G]`` similarity of two feature matrices (the reference repository's name).

    Args:
        query_features: ``[Q, D]`` features.
        gallery_features: ``[G, D]`` features.
        normalize: L2-normalise both first (cosine similarity); False gives raw dot products.

    Returns:
        The ``[Q, G]`` matrix, in the inputs' dtype.
    """
    q, g = torch.as_tensor(query_features), torch.as_tensor(gallery_features)
    if normalize:
        q, g = F.normalize(q, dim=-1), F.normalize(g, dim=-1)
    return q @ g.T


def similarity_matrix(
    texts: dict[str, np.ndarray], images: dict[str, np.ndarray], calibrator: Any | None = None
) -> torch.Tensor:
    """Text->image scores ``[Q, G]``: cosine similarity of the raw features, or with a calibrator
    its fused top-K re-ranking of the raw and calibrated similarities (in query chunks)."""
    if calibrator is None:
        return cosine_similarity(texts["raw"], images["raw"])
    g_raw = F.normalize(torch.as_tensor(images["raw"]).float(), dim=-1)
    g_cal = F.normalize(torch.as_tensor(images["calibrated"]).float(), dim=-1)
    parts = []
    for s in range(0, len(texts["raw"]), FUSE_CHUNK):
        q_raw = F.normalize(torch.as_tensor(texts["raw"][s : s + FUSE_CHUNK]).float(), dim=-1)
        q_cal = F.normalize(torch.as_tensor(texts["calibrated"][s : s + FUSE_CHUNK]).float(), dim=-1)
        parts.append(torch.as_tensor(calibrator.fuse(q_raw @ g_raw.T, q_cal @ g_cal.T)).float())
    return torch.cat(parts) if parts else torch.zeros(0, len(g_raw))


def dataset_token_views(
    encoder: Encoder,
    dataset: RetrievalDataset,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> Any:
    """The encoder's token views of ``dataset`` (`calibclip.data.tokens.TokenViews`), cached in fp16
    under the feature cache's root (``tokens/``) unless the cache is disabled (then a temporary folder)."""
    import tempfile

    from calibclip.data.tokens import cache_key, extract_token_views

    if cache is not None and cache.enabled:
        import hashlib
        import json

        key = cache_key(encoder, dataset.images, dataset.captions)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return extract_token_views(
            encoder,
            dataset.images,
            dataset.captions,
            cache.root.parent / "tokens" / digest,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
        )
    with tempfile.TemporaryDirectory(prefix="calibclip-tokens-") as tmp:
        return extract_token_views(
            encoder, dataset.images, dataset.captions, tmp, batch_size=batch_size, workers=workers, progress=progress
        )


def rerank_similarity(sim: torch.Tensor, views: Any, reranking: Any, chunk: int = 256) -> torch.Tensor:
    """Re-rank each query's top-K of ``sim`` ``[Q, G]`` with a `calibclip.calibration.reranker.Reranking`
    (the trained re-ranker) over the dataset's token views; returns float64 ``[Q, G]`` scores where only
    the top-K moved."""
    model = reranking.reranker
    with torch.inference_mode():
        gallery = (
            torch.cat(
                [
                    model.project_image(views.image_tokens[s : s + 256].float()).half()
                    for s in range(0, len(views.image_tokens), 256)
                ]
            )
            if len(views.image_tokens)
            else None
        )
        parts = []
        for s in range(0, sim.shape[0], chunk):
            rows = torch.arange(s, min(s + chunk, sim.shape[0]))
            tokens, mask = views.texts(rows, model.config.max_text_tokens)
            text, pad = model.project_text(tokens, mask)
            parts.append(reranking.rerank_matrix(sim[s : s + chunk], text, pad, gallery, chunk=64))
    return torch.cat(parts) if parts else torch.zeros(0, sim.shape[1], dtype=torch.float64)


def dataset_metrics(similarity: torch.Tensor | np.ndarray, dataset: RetrievalDataset) -> dict[str, float]:
    """Person datasets: ``R@1 R@5 R@10 mAP mINP``; caption datasets: ``t2i_R@K`` and ``i2t_R@K``."""
    if dataset.info.get("task") == "person":
        return retrieval_metrics(similarity, dataset.caption_ids, dataset.image_ids)
    return caption_metrics(similarity, dataset.caption_image)


def evaluate_retrieval(
    encoder: Encoder,
    dataset: RetrievalDataset,
    batch_size: int = 64,
    workers: int = 0,
    cache: FeatureCache | None = None,
    calibrator: Any | None = None,
    progress: bool = True,
    timings: dict[str, float] | None = None,
    reranking: Any | None = None,
) -> dict[str, float]:
    """Metrics (percent) of ``encoder`` on ``dataset`` (see `dataset_metrics` for the keys).

    ``calibrator``: a `calibclip.calibration.Calibrator`; its calibrated features are cached beside
    the raw ones and the ranking is its fused re-ranking. ``reranking``: a
    `calibclip.calibration.reranker.Reranking` (the trained re-ranker) that re-scores the top-K of
    that ranking (plain or calibrated). ``timings`` (optional dict) receives ``features_s`` and ``metrics_s``.
    """
    t0 = time.perf_counter()
    texts, images = dataset_features(encoder, dataset, batch_size, workers, cache, calibrator, progress)
    views = dataset_token_views(encoder, dataset, cache, batch_size, workers, progress) if reranking else None
    t1 = time.perf_counter()
    sim = similarity_matrix(texts, images, calibrator)
    if reranking is None:
        metrics = dataset_metrics(sim, dataset)
    else:  # text queries are re-ranked; image->text keys (caption datasets) keep the ranking below
        metrics = dataset_metrics(rerank_similarity(sim, views, reranking), dataset)
        if any(k.startswith("i2t") for k in metrics):
            base = dataset_metrics(sim, dataset)
            metrics.update({k: v for k, v in base.items() if k.startswith("i2t")})
    if timings is not None:
        timings.update(features_s=t1 - t0, metrics_s=time.perf_counter() - t1)
    return metrics


class Evaluator:
    """Seed API: ``Evaluator(model, device="cpu").evaluate(loader)`` ->
    ``{"rank1", "rank5", "rank10", "mAP", "mINP"}`` (percent, text->image, IRRA definitions).

    ``model``: an `Encoder` or a `calibclip.CalibCLIP` (then its calibrated re-ranking is
    evaluated). ``loader``: an `calibclip.datasets.EvalLoader` (``build_dataloader``), a
    `RetrievalDataset`, or a torch ``DataLoader`` over a `calibclip.datasets` reference-style dataset
    (``build_dataset``). For caption datasets the ids are the images, so mAP there is the mean
    reciprocal rank of the caption's image.

    Without a model it is the reference repository's metrics-only evaluator:
    ``Evaluator(topk=[1, 5, 10]).evaluate(similarity_matrix, ground_truth)`` (fractions; see
    `calibclip.evaluation.metrics.ground_truth_metrics`).

    Args:
        model: The encoder to evaluate (`Encoder` or `CalibCLIP`); None for the metrics-only form. A
            list of ints in this position is read as ``topk`` (the reference's positional form).
        device: Where the model runs: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        cache: Feature cache for the dataset features (default: none, features are recomputed).
        calibrator: A `calibclip.calibration.Calibrator` whose fused re-ranking is evaluated.
        progress: Show progress bars while encoding.
        topk: The K of each ``R@K`` of the metrics-only form (default ``[1, 5, 10]``).
        compute_map: Metrics-only form: also return ``mAP``.
        compute_minp: Metrics-only form: also return ``mINP``.

    Raises:
        TypeError: ``model`` is neither an `Encoder`, a `CalibCLIP`, None nor a list of ints.
    """

    def __init__(
        self,
        model: Any = None,
        device: str | torch.device = "cpu",
        cache: FeatureCache | None = None,
        calibrator: Any | None = None,
        progress: bool = True,
        *,
        topk: Sequence[int] | None = None,
        compute_map: bool = True,
        compute_minp: bool = True,
    ):
        from calibclip.utils import resolve_device

        if isinstance(model, (list, tuple)) and all(isinstance(k, int) for k in model):
            topk, model = list(model), None  # reference form: Evaluator([1, 5, 10])
        self.topk = list(topk) if topk is not None else [1, 5, 10]
        self.compute_map = compute_map
        self.compute_minp = compute_minp
        if hasattr(model, "calibrator") and hasattr(model, "model"):  # CalibCLIP wrapper
            calibrator = calibrator or model.calibrator
            model = model.model
        if model is not None and not isinstance(model, Encoder):
            raise TypeError(f"Evaluator needs a calibclip Encoder or CalibCLIP, got {type(model).__name__}")
        self.model = model.to(resolve_device(device)).eval() if model is not None else None
        self.cache = cache
        self.calibrator = calibrator
        self.progress = progress

    def evaluate(
        self, loader: Any, ground_truth: dict[int, Sequence[int]] | None = None, query_type: str = "text"
    ) -> dict[str, float]:
        """Evaluate text->image retrieval.

        Args:
            loader: What `build_dataloader` returns, a `RetrievalDataset`, or a torch ``DataLoader``
                over a `calibclip.datasets.build_dataset` dataset. With ``ground_truth``: a ``[Q, G]``
                similarity matrix (NumPy or torch) instead.
            ground_truth: ``{query row: [positive gallery columns]}``; selects the metrics-only form.
            query_type: ``"text"`` or ``"image"``; recorded by the reference API, it does not change
                the metrics.

        Returns:
            With a model: ``{"rank1", "rank5", "rank10", "mAP", "mINP"}`` in percent. With
            ``ground_truth``: ``{"R@K" for K in topk, "mAP", "mINP"}`` as fractions in [0, 1].

        Raises:
            TypeError: ``loader`` is not one of the accepted types.
            ValueError: a metrics-only evaluator got no ``ground_truth``, a bad ``query_type``, or
                ``ground_truth`` that does not fit the matrix.
        """
        if query_type not in ("text", "image"):
            raise ValueError(f"query_type must be 'text' or 'image', got {query_type!r}")
        if ground_truth is not None:
            sim = loader.detach().cpu() if isinstance(loader, torch.Tensor) else np.asarray(loader)
            return ground_truth_metrics(sim, ground_truth, self.topk, self.compute_map, self.compute_minp)
        if self.model is None:
            raise ValueError(
                "this Evaluator has no model: call evaluate(similarity_matrix, ground_truth), or build it as "
                "Evaluator(model) to evaluate a dataset"
            )
        dataset = getattr(loader, "dataset", loader)
        transform = getattr(loader, "transform", None) or getattr(dataset, "eval_transform", None)
        dataset = getattr(dataset, "retrieval_dataset", dataset)  # reference-style dataset (build_dataset)
        if not isinstance(dataset, RetrievalDataset):
            raise TypeError(
                "Evaluator.evaluate expects calibclip.datasets.build_dataloader(...) or a RetrievalDataset, "
                f"got {type(loader).__name__}"
            )
        batch_size = int(getattr(loader, "batch_size", 64) or 64)
        workers = int(getattr(loader, "workers", getattr(loader, "num_workers", 0)) or 0)
        original = self.model.preprocess
        if transform is not None:
            self.model.preprocess = transform
        try:
            texts, images = dataset_features(
                self.model, dataset, batch_size, workers, self.cache, self.calibrator, self.progress
            )
        finally:
            self.model.preprocess = original
        sim = similarity_matrix(texts, images, self.calibrator)
        m = retrieval_metrics(sim, dataset.caption_ids, dataset.image_ids)
        return {"rank1": m["R@1"], "rank5": m["R@5"], "rank10": m["R@10"], "mAP": m["mAP"], "mINP": m["mINP"]}
