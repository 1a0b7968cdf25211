"""Text-based person retrieval datasets (IRRA protocol): CUHK-PEDES, ICFG-PEDES, RSTPReid.

Queries are the split's captions, the gallery is the split's images, and a caption matches every
gallery image of the same person id. Layouts (ROOT may also be the folder *containing* the
dataset folder named below)::

    CUHK-PEDES/  reid_raw.json       [{"split", "captions", "file_path", "id"}, ...]  + imgs/
    ICFG-PEDES/  ICFG-PEDES.json     same fields, splits train/test                    + imgs/
    RSTPReid/    data_captions.json  [{"id", "img_path", "captions", "split"}, ...]    + imgs/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibclip.data.records import DatasetError, RetrievalDataset, read_json, record_error, safe_relpath, type_name


@dataclass(frozen=True)
class PersonFormat:
    name: str
    folder: str
    annotation: str
    path_key: str
    splits: tuple[str, ...]


FORMATS = {
    "cuhkpedes": PersonFormat("cuhkpedes", "CUHK-PEDES", "reid_raw.json", "file_path", ("train", "val", "test")),
    "icfgpedes": PersonFormat("icfgpedes", "ICFG-PEDES", "ICFG-PEDES.json", "file_path", ("train", "test")),
    "rstpreid": PersonFormat("rstpreid", "RSTPReid", "data_captions.json", "img_path", ("train", "val", "test")),
}

CUHK_CAPTION_ALL_HELP = (
    "found caption_all.json, the original CUHK-PEDES release, which has no train/val/test split. "
    "Evaluation uses the standard identity split (11,003 / 1,000 / 1,000 ids) stored in reid_raw.json "
    "(the processed annotation file distributed with CUHK-PEDES and used by IRRA and later work): put "
    "reid_raw.json beside imgs/ in {root}"
)


def _listing(folder: Path) -> str:
    if not folder.is_dir():
        return "no such folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:12]) + (f" ... ({len(names)} entries)" if len(names) > 12 else "") or "empty folder"


def _locate(root: Path, fmt: PersonFormat) -> Path:
    """The folder holding the annotation file: ROOT or ROOT/<official folder name>."""
    for folder in (root, root / fmt.folder):
        if (folder / fmt.annotation).is_file():
            return folder
    for folder in (root, root / fmt.folder):
        if fmt.name == "cuhkpedes" and (folder / "caption_all.json").is_file():
            raise DatasetError(CUHK_CAPTION_ALL_HELP.format(root=folder))
    others = [f for f in FORMATS.values() if f is not fmt and (root / f.annotation).is_file()]
    hint = (
        f" This looks like {others[0].folder} ({others[0].annotation} is present): use --dataset {others[0].name}."
        if others
        else ""
    )
    raise DatasetError(
        f"{fmt.folder} annotation file {fmt.annotation} not found in {root} or {root / fmt.folder}. "
        f"Found: {_listing(root)}. Expected {fmt.annotation} and the images under imgs/.{hint}"
    )


def _check_entry(ann_file: Path, i: int, entry: object, fmt: PersonFormat, required: tuple[str, ...]) -> None:
    """Raise a `DatasetError` naming ``ann_file`` and record ``i`` unless ``entry`` has the format's fields
    with the right types."""
    expected = f'an object {{"id": int, "split": str, "captions": [str, ...], "{fmt.path_key}": relative path}}'
    if not isinstance(entry, dict):
        raise record_error(ann_file, i, f"is a {type_name(entry)}, not an object", expected)
    missing = [k for k in required if k not in entry]
    if missing:
        raise record_error(ann_file, i, f"lacks field(s) {missing} (has {sorted(entry)})", expected)
    ident = entry["id"]
    if isinstance(ident, bool) or not isinstance(ident, (int, str)) or (isinstance(ident, str) and not ident.isdigit()):
        raise record_error(ann_file, i, f'has "id" {type_name(ident)} {ident!r}', "a whole-number person id")
    if not isinstance(entry["split"], str):
        raise record_error(ann_file, i, f'has "split" of type {type_name(entry["split"])}', "a split name string")
    caps = entry["captions"]
    if not isinstance(caps, (str, list)) or (isinstance(caps, list) and not all(isinstance(c, str) for c in caps)):
        raise record_error(ann_file, i, f'has "captions" {type_name(caps)} {str(caps)[:40]}', "a list of strings")
    safe_relpath(entry[fmt.path_key], ann_file.parent / "imgs", f'{ann_file}: entry {i} "{fmt.path_key}"')


def load_person(name: str, root: str | Path, split: str = "test") -> RetrievalDataset:
    """Load one split of a person-retrieval dataset (``cuhkpedes`` | ``icfgpedes`` | ``rstpreid``).

    Every image of the split must exist (missing ones are listed); each entry must have the
    fields of its format. ``image_ids``/``caption_ids`` are the person ids.
    """
    if name not in FORMATS:
        raise ValueError(f"unknown person-retrieval dataset {name!r}; expected one of {sorted(FORMATS)}")
    fmt = FORMATS[name]
    if split not in fmt.splits:
        raise ValueError(f"{fmt.folder} has splits {list(fmt.splits)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{fmt.folder} root {root} does not exist (expected a folder with {fmt.annotation})")
    folder = _locate(root, fmt)
    ann_file = folder / fmt.annotation
    entries = read_json(ann_file, f"{fmt.folder} annotation file", f"re-download {fmt.annotation}")
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{ann_file}: expected a non-empty JSON list of annotations, got {type_name(entries)}")
    required = ("id", "split", "captions", fmt.path_key)
    for i, entry in enumerate(entries):
        _check_entry(ann_file, i, entry, fmt, required)
    chosen = [e for e in entries if e["split"] == split]
    if not chosen:
        present = sorted({str(e["split"]) for e in entries})
        raise DatasetError(f"{ann_file} has no entries of split {split!r}; splits present: {present}")
    image_dir = folder / "imgs"
    if not image_dir.is_dir():
        raise DatasetError(f"{fmt.folder} image folder {image_dir} is missing. Found in {folder}: {_listing(folder)}")
    images = [image_dir / e[fmt.path_key] for e in chosen]
    absent = [str(p.relative_to(image_dir)) for p in images if not p.is_file()]
    if absent:
        raise DatasetError(
            f"{len(absent)} of {len(images)} images of the {split} split are missing under {image_dir}, "
            f"e.g. {absent[:3]}; the paths come from the '{fmt.path_key}' field of {ann_file.name}"
        )
    captions: list[str] = []
    caption_ids: list[int] = []
    caption_image: list[int] = []
    for i, entry in enumerate(chosen):
        caps = entry["captions"]
        if isinstance(caps, str):
            caps = [caps]
        for cap in caps:
            captions.append(str(cap).strip())
            caption_ids.append(int(entry["id"]))
            caption_image.append(i)
    if not captions:
        raise DatasetError(f"{ann_file}: the {split} split has images but no captions")
    return RetrievalDataset(
        name=name,
        split=split,
        root=folder,
        images=images,
        image_ids=np.asarray([int(e["id"]) for e in chosen]),
        captions=captions,
        caption_ids=np.asarray(caption_ids),
        caption_image=np.asarray(caption_image),
        info={"task": "person", "annotation": str(ann_file)},
    )


def load_cuhkpedes(root: str | Path, split: str = "test") -> RetrievalDataset:
    """CUHK-PEDES (``reid_raw.json`` + ``imgs/``); splits train/val/test."""
    return load_person("cuhkpedes", root, split)


def load_icfgpedes(root: str | Path, split: str = "test") -> RetrievalDataset:
    """ICFG-PEDES (``ICFG-PEDES.json`` + ``imgs/``); splits train/test."""
    return load_person("icfgpedes", root, split)


def load_rstpreid(root: str | Path, split: str = "test") -> RetrievalDataset:
    """RSTPReid (``data_captions.json`` + ``imgs/``); splits train/val/test."""
    return load_person("rstpreid", root, split)
