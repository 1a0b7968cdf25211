"""Composed image retrieval datasets: FashionIQ, CIRR and the generated CSS-style benchmark.

Every loader returns `ComposedDataset` records: a gallery of images, and queries made of a
reference image (index into the gallery), one or more modification texts and, where the split
has ground truth, the target image. Files are validated up front; a missing or misnamed file
is reported with what was found, what was expected and what to do.

Layouts
- FashionIQ: ``ROOT/captions/cap.<cat>.<split>.json`` (``candidate``, ``target``,
  ``captions`` = two texts), ``ROOT/image_splits/split.<cat>.<split>.json`` (list of ASINs),
  ``ROOT/images/<asin>.jpg`` (``.png``/``.jpeg`` accepted). Categories: dress, shirt, toptee.
- CIRR: ``captions/cap.rc2.<split>.json`` (``pairid``, ``reference``, ``target_hard``,
  ``caption``, ``img_set.members``) and ``image_splits/split.rc2.<split>.json`` (name ->
  relative path such as ``./dev/dev-244-0-img0.png``), either directly in ROOT or in
  ``ROOT/cirr/`` (the official release); image paths are relative to ROOT. Splits: train, val,
  test1 (no targets: test-server submission only).
- CSS (``calibclip make-css``): the CIRR layout with splits train, val, test.
- Pseudo-CIR (``calibclip make-pseudo-cir``): ``ROOT/pseudo-cir.<split>.json`` (annotations only;
  the images stay in the captioned dataset's folder, whose path the file records).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibclip.data.captions import load_flickr8k
from calibclip.data.records import DatasetError, RetrievalDataset, read_json, record_error, safe_relpath, type_name

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
FASHIONIQ_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


@dataclass
class ComposedDataset:
    """Composed-retrieval queries over one gallery.

    images:      gallery image paths ``[G]`` (for FashionIQ: every image of the category's split).
    image_names: gallery image names ``[G]`` (ASIN / CIRR name), used in submissions.
    reference:   index into ``images`` of each query's reference image ``[Q]``.
    target:      index of each query's target image ``[Q]``; -1 where the split has no targets.
    captions:    each query's modification texts (FashionIQ: two, CIRR/CSS: one).
    pair_ids:    query identifiers (CIRR ``pairid``; FashionIQ the query's position).
    subsets:     ``[Q, S]`` gallery indices of each query's image set (CIRR ``img_set.members``,
                 reference included), or None.
    """

    name: str
    split: str
    root: Path
    images: list[Path]
    image_names: list[str]
    reference: np.ndarray
    target: np.ndarray
    captions: list[tuple[str, ...]]
    pair_ids: list[int]
    subsets: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reference = np.asarray(self.reference, dtype=np.int64)
        self.target = np.asarray(self.target, dtype=np.int64)
        q = len(self.captions)
        if len(self.images) != len(self.image_names) or len(self.reference) != q or len(self.target) != q:
            raise ValueError("inconsistent composed dataset arrays")
        if len(self.pair_ids) != q or (self.subsets is not None and len(self.subsets) != q):
            raise ValueError("inconsistent composed dataset arrays")

    @property
    def has_targets(self) -> bool:
        return bool(len(self.target)) and bool((self.target >= 0).all())

    def __len__(self) -> int:
        return len(self.captions)

    def __repr__(self) -> str:
        return f"ComposedDataset({self.name}/{self.split}: {len(self.images)} images, {len(self)} queries)"


def _read_json(path: Path, what: str, hint: str) -> Any:
    return read_json(path, what, hint)


FASHIONIQ_PAIR = '{"candidate": ASIN, "target": ASIN (absent in test), "captions": [str, str]}'
CIRR_PAIR = (
    '{"pairid": int, "reference": name, "target_hard": name (absent in test1), "caption": str, '
    '"img_set": {"members": [name, ...]} (optional)}'
)


def _check_names(path: Path, names: Any) -> None:
    """A FashionIQ image split: a list of ASINs (plain names: no folders, so nothing outside images/)."""
    if not isinstance(names, list):
        raise DatasetError(f"{path}: expected a JSON list of image names (ASINs), got {type_name(names)}")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n or "/" in n or "\\" in n or n in (".", "..") or "\0" in n:
            raise record_error(
                path,
                i,
                f"is {type_name(n)} {str(n)[:60]!r}, refused",
                "an image name (ASIN) without folders: images are read from ROOT/images/ only",
            )


def _check_fashioniq_pairs(path: Path, pairs: Any) -> None:
    if not isinstance(pairs, list):
        raise DatasetError(f"{path}: expected a JSON list of {FASHIONIQ_PAIR}, got {type_name(pairs)}")
    for i, p in enumerate(pairs):
        if not isinstance(p, dict):
            raise record_error(path, i, f"is a {type_name(p)}, not an object", FASHIONIQ_PAIR)
        if not isinstance(p.get("candidate"), str) or ("target" in p and not isinstance(p["target"], str)):
            raise record_error(
                path, i, f"has candidate/target {p.get('candidate')!r}/{p.get('target')!r}", FASHIONIQ_PAIR
            )
        caps = p.get("captions")
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise record_error(path, i, f'has "captions" {type_name(caps)} {str(caps)[:60]}', FASHIONIQ_PAIR)


def _check_cirr_files(split_file: Path, relpaths: Any, cap_file: Path, pairs: Any, root: Path) -> None:
    """Types of a CIRR-layout image split (name -> relative path inside ``root``) and captions file."""
    if not isinstance(relpaths, dict):
        raise DatasetError(
            f"{split_file}: expected a JSON object mapping image names to relative paths "
            f'("dev-1-0-img0": "./dev/dev-1-0-img0.png"), got {type_name(relpaths)}'
        )
    for name, rel in relpaths.items():
        safe_relpath(rel, root, f"{split_file}: image {name!r}")
    if not isinstance(pairs, list):
        raise DatasetError(f"{cap_file}: expected a JSON list of {CIRR_PAIR}, got {type_name(pairs)}")
    for i, p in enumerate(pairs):
        if not isinstance(p, dict):
            raise record_error(cap_file, i, f"is a {type_name(p)}, not an object", CIRR_PAIR)
        missing = [k for k in ("pairid", "reference", "caption") if k not in p]
        if missing:
            raise record_error(cap_file, i, f"lacks field(s) {missing} (has {sorted(p)})", CIRR_PAIR)
        pairid = p["pairid"]
        if isinstance(pairid, bool) or not isinstance(pairid, (int, str)) or not str(pairid).lstrip("-").isdigit():
            raise record_error(cap_file, i, f'has "pairid" {type_name(pairid)} {pairid!r}', CIRR_PAIR)
        if not isinstance(p["reference"], str) or ("target_hard" in p and not isinstance(p["target_hard"], str)):
            raise record_error(cap_file, i, "has a reference/target_hard that is not an image name", CIRR_PAIR)
        if not isinstance(p["caption"], str):
            raise record_error(cap_file, i, f'has "caption" {type_name(p["caption"])}', CIRR_PAIR)
        members = p.get("img_set", {"members": []})
        members = members.get("members") if isinstance(members, dict) else None
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise record_error(cap_file, i, f'has "img_set" {str(p.get("img_set"))[:60]}', CIRR_PAIR)


def _listing(folder: Path, limit: int = 12) -> str:
    if not folder.is_dir():
        return f"{folder} does not exist"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f" ... (+{len(names) - limit})" if len(names) > limit else ""
    return f"{folder} contains {names[:limit]}{more}"


def _missing_images_error(dataset: str, missing: Sequence[Path], total: int, expected: str) -> DatasetError:
    sample = ", ".join(str(p) for p in missing[:3])
    return DatasetError(
        f"{dataset}: {len(missing)} of {total} images listed by the annotations are missing (e.g. {sample}). "
        f"Expected {expected}. Download the images into that layout (or point --data-root at the folder that "
        "holds them)."
    )


# ----------------------------------------------------------------------------------------
# FashionIQ
# ----------------------------------------------------------------------------------------
def fashioniq_caption(first: str, second: str) -> str:
    """The validation query text of a FashionIQ pair (CLIP4Cir's convention): both relative
    captions joined by "and", the first capitalised."""
    return f"{first.strip('.?, ').capitalize()} and {second.strip('.?, ')}"


def fashioniq_caption_variants(first: str, second: str) -> tuple[str, str, str, str]:
    """The four training variants of a FashionIQ pair (CLIP4Cir augmentation, drawn uniformly):
    both captions in either order, or one of them alone. Variant 0 is the validation text."""
    a, b = first.strip(".?, "), second.strip(".?, ")
    return (f"{a.capitalize()} and {b}", f"{b.capitalize()} and {a}", a.capitalize(), b.capitalize())


def _fashioniq_image_index(image_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    if image_dir.is_dir():
        with os.scandir(image_dir) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext in FASHIONIQ_EXTENSIONS and stem not in index:
                    index[stem] = Path(entry.path)
    return index


def load_fashioniq(
    root: str | Path,
    split: str = "val",
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    check_images: bool = True,
) -> dict[str, ComposedDataset]:
    """FashionIQ, one `ComposedDataset` per category (gallery = every image of the category's
    split, the original protocol). ``split``: train | val | test (test has no targets)."""
    root = Path(root)
    bad = [c for c in categories if c not in FASHIONIQ_CATEGORIES]
    if bad:
        raise ValueError(f"unknown FashionIQ categories {bad}: use some of {list(FASHIONIQ_CATEGORIES)}")
    if not root.is_dir():
        raise DatasetError(
            f"FashionIQ root {root} does not exist; pass the folder holding captions/, image_splits/ and images/"
        )
    problems = []
    for cat in categories:
        for sub, fname in (("captions", f"cap.{cat}.{split}.json"), ("image_splits", f"split.{cat}.{split}.json")):
            if not (root / sub / fname).exists():
                problems.append(f"{sub}/{fname}")
    if problems:
        raise DatasetError(
            f"FashionIQ at {root}: missing {problems}. {_listing(root)}; {_listing(root / 'captions')}. Expected "
            f"captions/cap.<dress|shirt|toptee>.<train|val|test>.json and image_splits/split.<cat>.<split>.json "
            "from the official release."
        )
    image_dir = root / "images"
    index = _fashioniq_image_index(image_dir) if check_images else {}
    out: dict[str, ComposedDataset] = {}
    for cat in categories:
        names = _read_json(
            root / "image_splits" / f"split.{cat}.{split}.json",
            "FashionIQ image split",
            "re-download image_splits/ from the FashionIQ release",
        )
        pairs = _read_json(
            root / "captions" / f"cap.{cat}.{split}.json",
            "FashionIQ captions",
            "re-download captions/ from the FashionIQ release",
        )
        _check_names(root / "image_splits" / f"split.{cat}.{split}.json", names)
        _check_fashioniq_pairs(root / "captions" / f"cap.{cat}.{split}.json", pairs)
        position = {n: i for i, n in enumerate(names)}
        unknown = [p["candidate"] for p in pairs if p["candidate"] not in position]
        unknown += [p["target"] for p in pairs if "target" in p and p["target"] not in position]
        if unknown:
            raise DatasetError(
                f"FashionIQ {cat}/{split}: {len(unknown)} images named in captions are not in "
                f"image_splits/split.{cat}.{split}.json (e.g. {unknown[:3]}); the two files do not "
                "belong together"
            )
        if check_images:
            missing = [image_dir / f"{n}.jpg" for n in names if n not in index]
            if missing:
                raise _missing_images_error(
                    f"FashionIQ {cat}/{split}", missing, len(names), f"{image_dir}/<asin>.jpg (or .png)"
                )
            paths = [index[n] for n in names]
        else:
            paths = [image_dir / f"{n}.jpg" for n in names]
        out[cat] = ComposedDataset(
            name=f"fashioniq-{cat}",
            split=split,
            root=root,
            images=paths,
            image_names=list(names),
            reference=np.array([position[p["candidate"]] for p in pairs], dtype=np.int64),
            target=np.array([position[p["target"]] if "target" in p else -1 for p in pairs], dtype=np.int64),
            captions=[tuple(p["captions"]) for p in pairs],
            pair_ids=list(range(len(pairs))),
            info={"category": cat},
        )
    return out


# ----------------------------------------------------------------------------------------
# CIRR (and the CSS benchmark in CIRR's layout)
# ----------------------------------------------------------------------------------------
def _cirr_annotation_dir(root: Path) -> Path:
    return root / "cirr" if (root / "cirr" / "captions").is_dir() else root


def cirr_splits(root: str | Path) -> list[str]:
    """Splits with both a captions and an image-split file under ``root``."""
    ann = _cirr_annotation_dir(Path(root))
    found = []
    for p in sorted((ann / "captions").glob("cap.rc2.*.json")):
        split = p.name[len("cap.rc2.") : -len(".json")]
        if (ann / "image_splits" / f"split.rc2.{split}.json").exists():
            found.append(split)
    return found


def load_cirr(root: str | Path, split: str = "val", name: str = "cirr", check_images: bool = True) -> ComposedDataset:
    """CIRR (or any dataset in its layout, e.g. CSS): the gallery is every image of the split;
    ``subsets`` holds each query's ``img_set.members`` for Recall_subset."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{name} root {root} does not exist; pass the folder holding captions/ and image_splits/")
    ann = _cirr_annotation_dir(root)
    cap_file = ann / "captions" / f"cap.rc2.{split}.json"
    split_file = ann / "image_splits" / f"split.rc2.{split}.json"
    missing_files = [str(p.relative_to(root)) for p in (cap_file, split_file) if not p.exists()]
    if missing_files:
        have = cirr_splits(root)
        raise DatasetError(
            f"{name} at {root}: split {split!r} needs {missing_files}. Splits found: {have or 'none'}; "
            f"{_listing(ann)}. Expected captions/cap.rc2.<split>.json and image_splits/split.rc2.<split>.json "
            "(directly in the root or under cirr/)."
        )
    relpaths: dict[str, str] = _read_json(split_file, f"{name} image split", "regenerate or re-download it")
    pairs: list[dict[str, Any]] = _read_json(cap_file, f"{name} captions", "regenerate or re-download it")
    _check_cirr_files(split_file, relpaths, cap_file, pairs, root)
    names = list(relpaths)
    position = {n: i for i, n in enumerate(names)}
    referenced = [p["reference"] for p in pairs] + [p["target_hard"] for p in pairs if "target_hard" in p]
    referenced += [m for p in pairs for m in p.get("img_set", {}).get("members", [])]
    unknown = sorted({n for n in referenced if n not in position})
    if unknown:
        raise DatasetError(
            f"{name} {split}: {len(unknown)} images named in {cap_file.name} are not in "
            f"{split_file.name} (e.g. {unknown[:3]}); the two files do not belong together"
        )
    paths = [(root / relpaths[n]).resolve() if check_images else root / relpaths[n] for n in names]
    if check_images:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise _missing_images_error(
                f"{name} {split}",
                missing,
                len(paths),
                f"images at the relative paths of {split_file.name}, under {root}",
            )
    subsets = None
    if pairs and all("img_set" in p for p in pairs):
        width = max(len(p["img_set"]["members"]) for p in pairs)
        subsets = np.full((len(pairs), width), -1, dtype=np.int64)
        for i, p in enumerate(pairs):
            members = [position[m] for m in p["img_set"]["members"]]
            subsets[i, : len(members)] = members
    return ComposedDataset(
        name=name,
        split=split,
        root=root,
        images=paths,
        image_names=names,
        reference=np.array([position[p["reference"]] for p in pairs], dtype=np.int64),
        target=np.array([position[p["target_hard"]] if "target_hard" in p else -1 for p in pairs], dtype=np.int64),
        captions=[(p["caption"],) for p in pairs],
        pair_ids=[int(p["pairid"]) for p in pairs],
        subsets=subsets,
        info={"extra": {k: [p.get(k) for p in pairs] for k in ("novel", "kind") if pairs and k in pairs[0]}},
    )


def load_css(root: str | Path, split: str = "test", check_images: bool = True) -> ComposedDataset:
    """The generated CSS-style benchmark (`calibclip make-css`), read with the CIRR loader."""
    return load_cirr(root, split, name="css", check_images=check_images)


def load_fashioniq_categories(root: str | Path, split: str = "val") -> list[ComposedDataset]:
    """FashionIQ as the dataset table loads it: one `ComposedDataset` per category."""
    return list(load_fashioniq(root, split).values())


def load_cirr_split(root: str | Path, split: str = "val") -> list[ComposedDataset]:
    """CIRR as the dataset table loads it (``test`` means ``test1``)."""
    return [load_cirr(root, "test1" if split == "test" else split)]


def load_css_split(root: str | Path, split: str = "test") -> list[ComposedDataset]:
    """CSS as the dataset table loads it."""
    return [load_css(root, split)]


# ----------------------------------------------------------------------------------------
# Pseudo-CIR: composed triplets built from a captioned photo dataset (`calibclip make-pseudo-cir`)
# ----------------------------------------------------------------------------------------
PSEUDO_CIR_FORMAT = "calibclip-pseudo-cir/1"
#: Captioned datasets pseudo-CIR triplets can be built from.
PSEUDO_CIR_SOURCES = ("flickr8k",)


def pseudo_cir_split(split: str) -> str:
    """The canonical split name (``val`` is Flickr8k's ``dev``)."""
    return "dev" if split == "val" else split


def pseudo_cir_file(root: str | Path, split: str) -> Path:
    """``ROOT/pseudo-cir.<split>.json``, the annotation file of one split."""
    return Path(root) / f"pseudo-cir.{pseudo_cir_split(split)}.json"


def load_pseudo_cir_source(source: str, data_root: str | Path, split: str) -> RetrievalDataset:
    """The captioned dataset split the triplets refer to (images in split-file order)."""
    if source not in PSEUDO_CIR_SOURCES:
        raise ValueError(f"pseudo-CIR source {source!r} is not supported: use one of {', '.join(PSEUDO_CIR_SOURCES)}")
    return load_flickr8k(Path(data_root).resolve(), pseudo_cir_split(split))


def load_pseudo_cir(root: str | Path, split: str = "dev", data_root: str | Path | None = None) -> ComposedDataset:
    """Pseudo-CIR triplets written by `calibclip make-pseudo-cir` (only annotations: the images stay in
    the captioned dataset's folder, recorded as ``data_root`` in the file; ``data_root`` overrides it).

    The gallery is every image the triplets were built over (the source split, or its first
    ``max_images`` images); each query's ``info["variants"]`` holds all captions of its target
    (training augmentation)."""
    root = Path(root)
    path = pseudo_cir_file(root, split)
    if not path.is_file():
        have = sorted(p.name for p in root.glob("pseudo-cir.*.json")) if root.is_dir() else []
        raise DatasetError(
            f"pseudo-CIR split {pseudo_cir_split(split)!r}: {path} not found (found {have or 'none'} "
            f"in {root}); build it with `calibclip make-pseudo-cir --dataset flickr8k --data-root DIR "
            f"--split {pseudo_cir_split(split)} --out {root}`"
        )
    data = _read_json(path, "pseudo-CIR annotations", "rebuild it with `calibclip make-pseudo-cir`")
    if not isinstance(data, dict) or data.get("format") != PSEUDO_CIR_FORMAT:
        raise DatasetError(
            f"{path} is not a pseudo-CIR file (expected format {PSEUDO_CIR_FORMAT!r}); "
            "rebuild it with `calibclip make-pseudo-cir`"
        )
    source_root = Path(data_root) if data_root is not None else Path(data["data_root"])
    if not source_root.is_dir():
        raise DatasetError(
            f"{path} refers to images under {source_root}, which does not exist; pass the "
            f"{data['source']} folder (Python: load_pseudo_cir(..., data_root=DIR)) or rebuild the triplets"
        )
    source = load_pseudo_cir_source(data["source"], source_root, data["source_split"])
    names = [p.name for p in source.images][: int(data["images"])]
    if names != list(data["image_names"]):
        raise DatasetError(
            f"{path}: the images of {source_root} split {data['source_split']} differ from the ones "
            "the triplets were built on; rebuild them with `calibclip make-pseudo-cir`"
        )
    position = {n: i for i, n in enumerate(names)}
    triplets = data["triplets"]
    return ComposedDataset(
        name="pseudo-cir",
        split=pseudo_cir_split(split),
        root=root,
        images=list(source.images[: len(names)]),
        image_names=names,
        reference=np.array([position[t["reference"]] for t in triplets], dtype=np.int64),
        target=np.array([position[t["target"]] for t in triplets], dtype=np.int64),
        captions=[(t["caption"],) for t in triplets],
        pair_ids=[int(t["pairid"]) for t in triplets],
        info={
            "source": data["source"],
            "source_split": data["source_split"],
            "variants": [tuple(t["target_captions"]) for t in triplets],
        },
    )


def load_pseudo_cir_split(root: str | Path, split: str = "dev") -> list[ComposedDataset]:
    """Pseudo-CIR as the dataset table loads it."""
    return [load_pseudo_cir(root, split)]
