"""Caption-retrieval datasets: Flickr8k (official layout) and Karpathy-style JSON
(``dataset_flickr8k.json``, ``dataset_flickr30k.json``, ``dataset_coco.json``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from calibclip.data.records import (
    DatasetError,
    RetrievalDataset,
    read_json,
    read_text,
    record_error,
    safe_relpath,
    type_name,
)

FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _find(root: Path, *candidates: str) -> Path | None:
    for c in candidates:
        if (root / c).exists():
            return root / c
    return None


def load_flickr8k(root: str | Path, split: str = "dev") -> RetrievalDataset:
    """Flickr8k in its official layout::

        ROOT/Flicker8k_Dataset/*.jpg
        ROOT/Flickr8k_text/Flickr8k.token.txt        (IMAGE#k<TAB>caption)
        ROOT/Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt

    ``split``: train | dev (alias val) | test. Images listed in the split file but missing on
    disk are an error (listed), never silently dropped.
    """
    root = Path(root)
    if split not in FLICKR8K_SPLIT_FILES:
        raise ValueError(f"Flickr8k split must be one of {sorted(FLICKR8K_SPLIT_FILES)}, got {split!r}")
    if not root.is_dir():
        raise DatasetError(f"Flickr8k root {root} does not exist")
    text_dir = _find(root, "Flickr8k_text", "Flickr8k_text/Flickr8k_text") or root
    image_dir = _find(root, "Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
    token_file = text_dir / "Flickr8k.token.txt"
    split_file = text_dir / FLICKR8K_SPLIT_FILES[split]
    problems = []
    if image_dir is None:
        problems.append(f"image folder {root}/Flicker8k_Dataset/ (the official, misspelt name) is missing")
    if not token_file.exists():
        problems.append(f"caption file {token_file} is missing")
    if not split_file.exists() and not problems:
        present = [name for name, f in FLICKR8K_SPLIT_FILES.items() if name != "val" and (text_dir / f).exists()]
        hint = (
            f"use --split {'dev' if 'dev' in present else present[0]}"
            if present
            else ("put the Flickr_8k.<split>Images.txt files from the official release there")
        )
        raise DatasetError(
            f"Flickr8k at {root} has no {split} split ({split_file.name} is missing from {text_dir}); "
            f"splits present: {present or 'none'}; {hint}"
        )
    if not split_file.exists():
        problems.append(f"split file {split_file} is missing")
    if problems:
        found = sorted(p.name for p in root.iterdir())
        raise DatasetError(
            "Flickr8k at " + str(root) + ": " + "; ".join(problems) + f". Found: {found}. Expected the official "
            "layout (Flicker8k_Dataset/, Flickr8k_text/Flickr8k.token.txt, Flickr8k_text/Flickr_8k.<split>Images.txt)."
        )
    names = [ln.strip() for ln in read_text(split_file, "Flickr8k split file").splitlines() if ln.strip()]
    by_image: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for lineno, line in enumerate(read_text(token_file, "Flickr8k caption file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            key, caption = line.split("\t", 1)
            name, k = key.rsplit("#", 1)
            by_image[name].append((int(k), caption.strip()))
        except ValueError as exc:
            raise DatasetError(f"{token_file}:{lineno}: expected 'IMAGE#k<TAB>caption', got {line[:80]!r}") from exc
    missing = [n for n in names if not (image_dir / n).exists()]  # type: ignore[operator]
    if missing:
        raise DatasetError(f"{len(missing)} images of split {split} are missing from {image_dir}, e.g. {missing[:3]}")
    no_caps = [n for n in names if n not in by_image]
    if no_caps:
        raise DatasetError(
            f"{len(no_caps)} images of split {split} have no caption in {token_file}, e.g. {no_caps[:3]}"
        )
    captions: list[str] = []
    caption_image: list[int] = []
    for i, name in enumerate(names):
        for _, cap in sorted(by_image[name]):
            captions.append(cap)
            caption_image.append(i)
    return RetrievalDataset(
        name="flickr8k",
        split=split,
        root=root,
        images=[image_dir / n for n in names],  # type: ignore[operator]
        image_ids=np.arange(len(names)),
        captions=captions,
        caption_ids=np.asarray(caption_image),
        caption_image=np.asarray(caption_image),
    )


KARPATHY_IMAGE = (
    'an object {"filename": str, "split": str, "sentences": [{"raw": str} or {"tokens": [str]}, ...]} '
    '(optional "filepath": relative folder)'
)


def _check_karpathy_image(ann_file: Path, i: int, im: object) -> None:
    """Raise a `DatasetError` naming ``ann_file`` and image entry ``i`` unless it is a well-formed record."""
    if not isinstance(im, dict):
        raise record_error(ann_file, i, f"of 'images' is a {type_name(im)}, not an object", KARPATHY_IMAGE)
    missing = [k for k in ("filename", "split", "sentences") if k not in im]
    if missing:
        raise record_error(ann_file, i, f"of 'images' lacks field(s) {missing} (has {sorted(im)})", KARPATHY_IMAGE)
    where = f"{ann_file}: entry {i} of 'images'"
    safe_relpath(im["filename"], ann_file.parent, f'{where} "filename"')
    if im.get("filepath"):
        safe_relpath(im["filepath"], ann_file.parent, f'{where} "filepath"')
    sents = im["sentences"]
    if not isinstance(sents, list):
        raise record_error(ann_file, i, f"of 'images' has \"sentences\" {type_name(sents)}", KARPATHY_IMAGE)
    for j, sent in enumerate(sents):
        raw = sent.get("raw") if isinstance(sent, dict) else None
        tokens = sent.get("tokens") if isinstance(sent, dict) else None
        if not (isinstance(raw, str) and raw.strip()) and not (
            isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)
        ):
            raise record_error(ann_file, i, f"of 'images' has sentence {j} = {str(sent)[:60]}", KARPATHY_IMAGE)


def load_karpathy(root: str | Path, split: str = "test", dataset: str | None = None) -> RetrievalDataset:
    """Karpathy-split JSON (``dataset_{flickr8k,flickr30k,coco}.json``) with images under
    ``ROOT/images/`` (or ``ROOT/<filepath>/`` for COCO). ``split``: train | restval | val | test."""
    root = Path(root)
    candidates = [root / f"dataset_{dataset}.json"] if dataset else sorted(root.glob("dataset_*.json"))
    candidates = [c for c in candidates if c.exists()]
    if not candidates:
        raise DatasetError(
            f"no Karpathy split file in {root}: expected dataset_flickr8k.json, dataset_flickr30k.json or "
            f"dataset_coco.json (found {sorted(p.name for p in root.iterdir()) if root.is_dir() else 'no folder'})"
        )
    if len(candidates) > 1:
        raise DatasetError(f"several Karpathy files in {root} ({[c.name for c in candidates]}): pass dataset=")
    ann_file = candidates[0]
    data = read_json(ann_file, "Karpathy split file", "re-download it (it is a JSON object with an 'images' list)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        got = type_name(data)
        if isinstance(data, dict):
            got = f"an object whose 'images' is {type_name(data.get('images'))}"
        raise DatasetError(f"{ann_file}: expected a JSON object with an 'images' list, got {got}")
    for i, im in enumerate(data["images"]):
        _check_karpathy_image(ann_file, i, im)
    entries = [im for im in data["images"] if im.get("split") == split]
    if not entries:
        splits = sorted({str(im.get("split")) for im in data["images"]})
        raise DatasetError(f"{ann_file.name} has no images in split {split!r}; splits present: {splits}")
    image_dirs = [root / "images", root / "Images", root / "Flicker8k_Dataset", root / "flickr30k-images", root]
    images: list[Path] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for i, im in enumerate(entries):
        rel = Path(im.get("filepath", "")) / im["filename"]
        path = next((d / rel for d in image_dirs if (d / rel).exists()), None)
        if path is None:
            path = next((d / im["filename"] for d in image_dirs if (d / im["filename"]).exists()), None)
        if path is None:
            raise DatasetError(f"image {rel} of {candidates[0].name} not found under {root}/images/ or {root}/")
        images.append(path)
        for sent in im["sentences"]:
            captions.append(sent.get("raw") or " ".join(sent.get("tokens") or []))
            caption_image.append(i)
    return RetrievalDataset(
        name=candidates[0].stem.replace("dataset_", ""),
        split=split,
        root=root,
        images=images,
        image_ids=np.arange(len(images)),
        captions=captions,
        caption_ids=np.asarray(caption_image),
        caption_image=np.asarray(caption_image),
    )
