"""Pseudo-CIR: a composed-retrieval benchmark built deterministically from real captioned photos
(`calibclip make-pseudo-cir`; the rule and its failure modes: docs/composed-pseudo-cir.md).

Rule, over the images of one split (or its first ``max_images``), with the encoder's features
(image features and caption features, L2-normalised; an image's *caption centroid* is the
normalised mean of its captions' features):

1. Every image is a target ``T`` once (split-file order).
2. Its candidates are its ``neighbours`` nearest other images by image similarity, leaving out
   near-duplicates (image cosine >= ``duplicate_threshold``).
3. The reference ``R`` is the candidate whose caption centroid is *least* similar to ``T``'s:
   it looks like ``T`` but is described differently (ties: the visually closer one).
   ``references_per_target`` > 1 takes the next least similar candidates too (more triplets).
4. The modification text is the caption of ``T`` that is least similar to every caption of
   ``R`` (its maximum cosine to ``R``'s captions is the smallest): what distinguishes ``T``.

So the ground truth is never the reference, the reference alone does not find the target
reliably (it is one of several look-alikes), and the text alone is ambiguous among images with
similar captions. The output holds annotations only: image *names* and the dataset folder's
path, never image data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibclip.data.cache import FeatureCache
from calibclip.data.composed import (
    PSEUDO_CIR_FORMAT,
    PSEUDO_CIR_SOURCES,
    load_pseudo_cir_source,
    pseudo_cir_file,
    pseudo_cir_split,
)
from calibclip.data.records import RetrievalDataset
from calibclip.models.base import Encoder

#: Shard size of the feature cache for dataset images (the one evaluation uses, so features are shared).
SHARD_SIZE = 256
#: Image cosine at or above which a neighbour counts as a near-duplicate of the target (never a reference).
DUPLICATE_THRESHOLD = 0.98


def source_image_features(
    encoder: Encoder,
    source: RetrievalDataset,
    count: int,
    cache: FeatureCache,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Raw features of the first ``count`` images of ``source``, cached under the same key as
    `calibclip evaluate --dataset flickr8k` uses (for the whole split), so either run fills it for the other."""
    tags: dict[str, Any] = {"dataset": source.name, "split": source.split, "preprocess": encoder.preprocess.describe()}
    return cache.image_features(
        encoder, source.images[:count], batch_size=batch_size, workers=workers, progress=progress, **tags
    )["raw"]


@torch.inference_mode()
def build_triplets(
    image_feats: torch.Tensor,
    caption_feats: torch.Tensor,
    caption_image: np.ndarray,
    neighbours: int = 10,
    references_per_target: int = 1,
    duplicate_threshold: float = DUPLICATE_THRESHOLD,
) -> list[dict[str, Any]]:
    """The pseudo-CIR rule on features (module docstring). ``caption_image[j]``: image of caption ``j``.

    Returns:
        One dict per triplet: ``reference``, ``target`` (image indices), ``caption`` (caption index),
        ``visual_rank`` (1 = the nearest neighbour), ``image_similarity``, ``caption_similarity``.

    Raises:
        ValueError: fewer than 2 images, or bad parameters.
    """
    n = len(image_feats)
    if n < 2:
        raise ValueError(f"pseudo-CIR needs at least 2 images, got {n}")
    if neighbours < 1 or not 1 <= references_per_target <= neighbours:
        raise ValueError(
            f"need neighbours >= 1 and 1 <= references_per_target <= neighbours, got {neighbours}, "
            f"{references_per_target}"
        )
    img = F.normalize(torch.as_tensor(image_feats).float(), dim=-1)
    cap = F.normalize(torch.as_tensor(caption_feats).float(), dim=-1)
    owner = torch.as_tensor(caption_image, dtype=torch.long)
    centroid = F.normalize(torch.zeros(n, cap.shape[1]).index_add_(0, owner, cap), dim=-1)
    per_image = [torch.nonzero(owner == i).flatten() for i in range(n)]
    sim = img @ img.T
    sim.fill_diagonal_(float("-inf"))
    sim[sim >= duplicate_threshold] = float("-inf")  # near-duplicates are no references
    k = min(neighbours, n - 1)
    top_sim, top_idx = sim.topk(k, dim=1)  # sorted: visually closest first
    sem = (centroid[top_idx] * centroid[:, None, :]).sum(-1)  # [N, k] caption-centroid similarity
    sem = sem.masked_fill(torch.isinf(top_sim), float("inf"))
    # least similar descriptions first; a stable sort keeps the visually closer candidate on ties
    order = torch.argsort(sem, dim=1, stable=True)
    triplets: list[dict[str, Any]] = []
    for t in range(n):
        for slot in order[t, : min(references_per_target, k)].tolist():
            if torch.isinf(top_sim[t, slot]):
                continue
            r = int(top_idx[t, slot])
            mine, theirs = per_image[t], per_image[r]
            closeness = (cap[mine] @ cap[theirs].T).max(dim=1).values  # each T caption vs its closest R caption
            j = int(torch.argmin(closeness))  # first minimum: deterministic
            triplets.append(
                {
                    "reference": r,
                    "target": t,
                    "caption": int(mine[j]),
                    "visual_rank": slot + 1,
                    "image_similarity": round(float(top_sim[t, slot]), 4),
                    "caption_similarity": round(float(sem[t, slot]), 4),
                }
            )
    return triplets


def make_pseudo_cir(
    encoder: Encoder,
    dataset: str,
    data_root: str | Path,
    split: str,
    out_dir: str | Path,
    cache: FeatureCache | None = None,
    neighbours: int = 10,
    references_per_target: int = 1,
    max_images: int | None = None,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``OUT/pseudo-cir.<split>.json`` for one split of a captioned dataset.

    Args:
        encoder: the encoder whose features choose the references and texts (recorded in the file).
        dataset: the captioned source dataset (``flickr8k``).
        data_root: its folder (recorded as an absolute path; images are never copied).
        split: its split (``val`` means ``dev``).
        out_dir: output folder (created); an existing file for the split is replaced.
        cache: feature cache (features of the images and captions).
        neighbours: visual candidates per target (step 2 of the rule).
        references_per_target: triplets per target image.
        max_images: use only the first N images of the split (split-file order).
        batch_size, workers: image encoding settings.
        progress: show progress bars.

    Returns:
        A summary: file, counts, timings and the rule's settings.

    Raises:
        ValueError: an unsupported dataset or bad parameters.
    """
    if dataset not in PSEUDO_CIR_SOURCES:
        raise ValueError(f"make-pseudo-cir supports --dataset {', '.join(PSEUDO_CIR_SOURCES)}, got {dataset!r}")
    if max_images is not None and max_images < 2:
        raise ValueError(f"--max-images must be >= 2, got {max_images}")
    t0 = time.perf_counter()
    root = Path(data_root).resolve()
    split = pseudo_cir_split(split)
    source = load_pseudo_cir_source(dataset, root, split)
    count = min(len(source.images), max_images or len(source.images))
    cache = cache or FeatureCache(shard_size=SHARD_SIZE)
    image_feats = source_image_features(encoder, source, count, cache, batch_size, workers, progress)
    keep = np.nonzero(source.caption_image < count)[0]
    captions = [source.captions[i] for i in keep]
    caption_feats = cache.text_features(
        encoder, captions, progress=progress, dataset=source.name, split=split, preprocess=encoder.preprocess.describe()
    )["raw"]
    owner = source.caption_image[keep]
    triplets = build_triplets(
        torch.from_numpy(image_feats), torch.from_numpy(caption_feats), owner, neighbours, references_per_target
    )
    names = [p.name for p in source.images[:count]]
    by_image: dict[int, list[str]] = {}
    for c, i in zip(captions, owner.tolist()):
        by_image.setdefault(i, []).append(c)
    records = [
        {
            "pairid": n,
            "reference": names[t["reference"]],
            "target": names[t["target"]],
            "caption": captions[t["caption"]],
            "target_captions": by_image[t["target"]],
            **{k: t[k] for k in ("visual_rank", "image_similarity", "caption_similarity")},
        }
        for n, t in enumerate(triplets)
    ]
    rule = {
        "neighbours": neighbours,
        "references_per_target": references_per_target,
        "duplicate_threshold": DUPLICATE_THRESHOLD,
        "reference": "least similar caption centroid among the visual neighbours",
        "text": "target caption least similar to the reference's captions",
    }
    data = {
        "format": PSEUDO_CIR_FORMAT,
        "source": dataset,
        "data_root": str(root),
        "source_split": split,
        "images": count,
        "max_images": max_images,
        "encoder": encoder.fingerprint(),
        "encoder_name": encoder.name,
        "rule": rule,
        "image_names": names,
        "triplets": records,
    }
    path = pseudo_cir_file(out_dir, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    ranks = np.array([t["visual_rank"] for t in triplets])
    return {
        "file": str(path),
        "split": split,
        "images": count,
        "triplets": len(records),
        "references": len({t["reference"] for t in triplets}),
        "median_visual_rank": float(np.median(ranks)) if len(ranks) else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "rule": rule,
    }
