"""Suggested modifications for composed search, from an annotated dataset's captions.

Accepted files (JSON list of objects), the formats the project's composed loaders read:

- CIRR / CSS-style (``calibclip make-css`` writes these): ``{"reference": NAME, "caption": TEXT,
  "target_hard": NAME, ...}``
- FashionIQ-style: ``{"candidate": NAME, "captions": [TEXT, TEXT], "target": NAME}``

Image NAMEs are matched to indexed images by file name without extension (CIRR/FashionIQ
convention) or by path relative to the indexed folder.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Annotation:
    reference: str
    text: str
    target: str | None


def _normalise_text(text: str) -> str:
    return " ".join(text.lower().split())


def read_annotations(path: str | Path) -> list[Annotation]:
    """Read a CIRR/CSS-style or FashionIQ-style captions file (see module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"captions file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"captions file {path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, list):
        raise ValueError(
            f"captions file {path}: expected a JSON list of annotation objects, found {type(data).__name__}"
        )
    out: list[Annotation] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"captions file {path}: entry {i} is not an object")
        if "reference" in item and "caption" in item:
            target = item.get("target_hard", item.get("target"))
            out.append(
                Annotation(str(item["reference"]), str(item["caption"]), None if target is None else str(target))
            )
        elif "candidate" in item and "captions" in item:
            caps = item["captions"] if isinstance(item["captions"], list) else [item["captions"]]
            target = item.get("target")
            text = " and ".join(str(c).strip() for c in caps if str(c).strip())
            out.append(Annotation(str(item["candidate"]), text, None if target is None else str(target)))
        else:
            raise ValueError(
                f"captions file {path}: entry {i} has keys {sorted(item)}; expected reference/caption/target_hard "
                "(CIRR, CSS) or candidate/captions/target (FashionIQ)"
            )
    return out


class Suggestions:
    """Annotated modifications keyed by indexed image id."""

    def __init__(self, annotations: Iterable[Annotation], paths: Mapping[int, str]):
        by_name: dict[str, int] = {}
        for image_id, rel in paths.items():
            p = Path(rel)
            by_name.setdefault(p.as_posix(), image_id)
            by_name.setdefault(p.stem, image_id)
            by_name.setdefault(p.name, image_id)
        self._by_ref: dict[int, list[tuple[str, int | None]]] = defaultdict(list)
        self._targets: dict[tuple[int, str], int] = {}
        self.unmatched = 0
        for a in annotations:
            ref = by_name.get(a.reference)
            if ref is None:
                self.unmatched += 1
                continue
            target = by_name.get(a.target) if a.target is not None else None
            self._by_ref[ref].append((a.text, target))
            if target is not None:
                self._targets.setdefault((ref, _normalise_text(a.text)), target)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_ref.values())

    def references(self) -> list[int]:
        """Indexed ids that have at least one suggestion."""
        return sorted(self._by_ref)

    def for_reference(self, image_id: int) -> list[tuple[str, int | None]]:
        """(text, target id or None) pairs annotated for ``image_id``."""
        return list(self._by_ref.get(image_id, []))

    def target(self, image_id: int, text: str) -> int | None:
        """Annotated target of (reference, modification text), or None."""
        return self._targets.get((image_id, _normalise_text(text)))
