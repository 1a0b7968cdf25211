"""Composed-retrieval evaluation on FashionIQ, CIRR, the generated CSS benchmark and pseudo-CIR
triplets of real captioned photos.

Features come from the project's `FeatureCache` (raw encoder features of every gallery image
and of every query text), so a second evaluation, or a training run's validation, is instant.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from calibclip.composed.baselines import CombiningFn, build_combining
from calibclip.data.cache import FeatureCache
from calibclip.data.composed import ComposedDataset, fashioniq_caption, fashioniq_caption_variants
from calibclip.data.registry import DatasetSpec, dataset_names, get_dataset
from calibclip.evaluation.composed_metrics import cirr_metrics, cirr_submission, fashioniq_metrics
from calibclip.models.base import Encoder

#: The validation split of each composed dataset (model selection in `train-combiner`; default ``val``).
VAL_SPLIT = {"pseudo-cir": "dev"}

#: Queries combined and scored per block.
QUERY_BLOCK = 2048


@dataclass
class ComposedFeatures:
    """Raw features of one `ComposedDataset`: gallery ``images`` ``[G, D]`` and query ``texts``
    ``[Q, D]``; ``variants`` ``[Q, V, D]`` holds the training caption variants (FashionIQ)."""

    images: torch.Tensor
    texts: torch.Tensor
    variants: torch.Tensor | None = None


def composed_spec(dataset: str) -> DatasetSpec:
    """The dataset table's entry of a composed-retrieval dataset.

    Raises:
        ValueError: unknown, or not a composed-retrieval dataset (the message lists those).
    """
    try:
        spec = get_dataset(dataset)
    except ValueError:
        spec = None
    if spec is None or spec.task != "composed":
        raise ValueError(f"unknown composed dataset {dataset!r}: use one of {', '.join(dataset_names('composed'))}")
    return spec


def headline_metric(dataset: str) -> str:
    """The metric a composed dataset's model selection (and headline) uses (default ``R@1``)."""
    return composed_spec(dataset).headline or "R@1"


def load_composed(dataset: str, data_root: str | Path, split: str) -> list[ComposedDataset]:
    """The `ComposedDataset` records of a dataset split (FashionIQ: one per category)."""
    return list(composed_spec(dataset).load(data_root, split))


def query_texts(ds: ComposedDataset) -> list[str]:
    """The text each query is evaluated with (FashionIQ: both captions joined by "and")."""
    return [fashioniq_caption(*c) if len(c) == 2 else c[0] for c in ds.captions]


def extract_features(
    encoder: Encoder,
    ds: ComposedDataset,
    cache: FeatureCache,
    batch_size: int = 32,
    workers: int = 0,
    variants: bool = False,
    progress: bool = True,
) -> ComposedFeatures:
    """Raw image and text features of ``ds`` through the feature cache. ``variants``: also the
    training text variants of every query (FashionIQ: the four caption variants; pseudo-CIR: every
    caption of the target). Pseudo-CIR galleries are the source dataset's images, cached under the
    source's own key (shared with `calibclip evaluate --dataset flickr8k` and `make-pseudo-cir`)."""
    tags: dict[str, Any] = {"dataset": ds.name, "split": ds.split}
    image_tags: dict[str, Any]
    if ds.name == "pseudo-cir":
        from calibclip.composed.pseudo_cir import SHARD_SIZE

        image_tags = {
            "dataset": ds.info["source"],
            "split": ds.info["source_split"],
            "preprocess": encoder.preprocess.describe(),
        }
        cache = FeatureCache(cache.root, cache.enabled, SHARD_SIZE)
    else:
        image_tags = tags
    images = cache.image_features(
        encoder, ds.images, batch_size=batch_size, workers=workers, progress=progress, **image_tags
    )["raw"]
    texts = cache.text_features(encoder, query_texts(ds), progress=progress, **tags)["raw"]
    var = None
    if variants and ds.info.get("variants"):
        options = ds.info["variants"]
        width = max(len(v) for v in options)
        flat = [v[i % len(v)] for v in options for i in range(width)]  # cycle short lists to a fixed width
        arr = cache.text_features(encoder, flat, progress=progress, variant="target-captions", **tags)["raw"]
        var = torch.from_numpy(arr).reshape(len(ds), width, -1)
    elif variants and ds.captions and len(ds.captions[0]) == 2:
        flat = [v for c in ds.captions for v in fashioniq_caption_variants(*c)]
        arr = cache.text_features(encoder, flat, progress=progress, variant="fashioniq-captions", **tags)["raw"]
        var = torch.from_numpy(arr).reshape(len(ds), 4, -1)
    return ComposedFeatures(torch.from_numpy(images), torch.from_numpy(texts), var)


@torch.inference_mode()
def score_queries(combine: CombiningFn, feats: ComposedFeatures, ds: ComposedDataset) -> torch.Tensor:
    """Cosine scores ``[Q, G]`` of each composed query against the gallery."""
    gallery = F.normalize(feats.images.float(), dim=-1)
    ref = torch.as_tensor(ds.reference)
    blocks = []
    for start in range(0, len(ds), QUERY_BLOCK):
        idx = ref[start : start + QUERY_BLOCK]
        query = combine(feats.images[idx], feats.texts[start : start + QUERY_BLOCK]).float()
        blocks.append(query @ gallery.T)
    return torch.cat(blocks) if blocks else torch.zeros(0, len(ds.images))


def metrics_from_features(
    dataset: str,
    datasets: Sequence[ComposedDataset],
    features: Sequence[ComposedFeatures],
    combine: CombiningFn,
) -> dict[str, float]:
    """The dataset's metrics for one combining function on precomputed features."""
    if dataset == "fashioniq":
        per_cat = {ds.info["category"]: (score_queries(combine, f, ds), ds.target) for ds, f in zip(datasets, features)}
        return fashioniq_metrics(per_cat)
    (ds,), (f,) = datasets, features
    subsets = ds.subsets if dataset == "cirr" else None
    return cirr_metrics(score_queries(combine, f, ds), ds.reference, ds.target, subsets)


def write_cirr_submission(
    ds: ComposedDataset, scores: torch.Tensor, out_dir: str | Path, tag: str = "calibclip"
) -> tuple[Path, Path]:
    """Write ``recall_submission_<tag>.json`` and ``recall_subset_submission_<tag>.json``."""
    if ds.subsets is None:
        raise ValueError(f"{ds.name}/{ds.split} has no img_set members; the CIRR subset submission needs them")
    recall, subset = cirr_submission(scores, ds.reference, ds.subsets, ds.pair_ids, ds.image_names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"recall_submission_{tag}.json", out / f"recall_subset_submission_{tag}.json")
    for path, obj in zip(paths, (recall, subset)):
        path.write_text(json.dumps(obj))
    return paths


def evaluate_composed(
    encoder: Encoder,
    dataset: str,
    data_root: str | Path,
    split: str,
    combining: str = "combiner",
    combiner: str | Path | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    workers: int = 0,
    submission_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate composed retrieval; returns the metrics (percent).

    Keys: FashionIQ ``<cat>_R@10 <cat>_R@50 avg_R@10 avg_R@50 avg`` (split val); CIRR ``R@1 R@5
    R@10 R@50 Rsubset@1 Rsubset@2 Rsubset@3 avg`` (reference removed from its ranking); CSS
    and pseudo-CIR ``R@1 R@5 R@10 R@50``. ``combiner=None`` with ``combining="combiner"``: the
    encoder's packaged Combiner. CIRR ``test1`` has no public targets: it needs ``submission_dir``,
    where the two test-server JSON files are written, and returns ``{}``.
    """
    dataset = composed_spec(dataset).name
    if dataset == "fashioniq" and split == "test":
        raise ValueError(
            "FashionIQ test has no target images (and no public evaluation server), so it cannot be "
            "scored; evaluate the val split"
        )
    cache = cache or FeatureCache()
    combine = build_combining(combining, combiner, encoder=encoder)
    datasets = load_composed(dataset, data_root, split)
    if not all(ds.has_targets for ds in datasets):
        if dataset != "cirr":
            raise ValueError(
                f"{dataset} split {split!r} has no target images, so it cannot be scored locally; "
                "evaluate the val split"
            )
        if submission_dir is None:
            raise ValueError(
                "CIRR test1 has no public targets: pass a submission directory to write the two "
                "test-server JSON files (then upload them to the CIRR evaluation server)"
            )
    features = [extract_features(encoder, ds, cache, batch_size, workers, progress=progress) for ds in datasets]
    if submission_dir is not None:
        if dataset != "cirr":
            raise ValueError("submission files exist for CIRR only")
        (ds,), (f,) = datasets, features
        write_cirr_submission(ds, score_queries(combine, f, ds), submission_dir, tag=f"{ds.split}_{combining}")
        if not ds.has_targets:
            return {}
    return metrics_from_features(dataset, datasets, features, combine)
