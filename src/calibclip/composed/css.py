"""A CSS-style compositional benchmark generated offline (after Vo et al., "Composing Text and
Image for Image Retrieval", CVPR 2019).

Scenes are 1-5 simple 2D objects (colour x shape x size) on a 3x3 grid, drawn with Pillow.
A query is a reference scene plus a modification that adds, removes or changes one object,
with a text that says so ("make the top-left red circle blue", "remove the small green
square", "add a large yellow triangle in the center"); the target is the modified scene.

Each reference scene gets ``mods_per_scene`` different modifications, so the gallery holds its
siblings: the reference image alone cannot tell which sibling the text asks for. Its image
set (CIRR ``img_set``) is the reference plus those siblings.

Held-out compositions: the (colour, shape) pairs in `HELD_OUT` never occur in the train or val
splits (not in a scene, a target or a text). Test scenes and modifications draw from every
pair, so many test queries involve an unseen pair (flag ``novel`` in the annotations).

Output (CIRR layout, read by `calibclip.data.composed.load_css`)::

    OUT/captions/cap.rc2.<split>.json       pairid, reference, target_hard, target_soft, caption,
                                             img_set {id, members, reference_rank, target_rank},
                                             kind (add/remove/colour/shape/size), novel
    OUT/image_splits/split.rc2.<split>.json name -> ./<split>/<name>.png
    OUT/<split>/<name>.png                   for split in train, val, test
    OUT/README.json                          generator settings and the held-out pairs
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from calibclip.utils import progress_bar

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
#: (colour, shape) compositions that train and val never show.
HELD_OUT = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "triangle")})
KINDS = ("add", "remove", "colour", "shape", "size")


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    cell: int  # 0..8, row-major on the 3x3 grid
    jitter: tuple[int, int] = (0, 0)

    def describe(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


Scene = tuple[Obj, ...]


def _where(cell: int) -> str:
    return "in the center" if POSITIONS[cell] == "center" else f"at the {POSITIONS[cell]}"


def draw_scene(scene: Scene, size: int = 128) -> Image.Image:
    """Render a scene on a white canvas."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell = size / 3.0
    for o in scene:
        cx = (o.cell % 3 + 0.5) * cell + o.jitter[0] * size / 128.0
        cy = (o.cell // 3 + 0.5) * cell + o.jitter[1] * size / 128.0
        r = cell * (0.42 if o.size == "large" else 0.22)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            s = r * 0.88
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)], fill=fill)
    return img


class _Sampler:
    def __init__(self, rng: random.Random, allow_held_out: bool):
        self.rng = rng
        self.pairs = [(c, s) for c in COLOURS for s in SHAPES if allow_held_out or (c, s) not in HELD_OUT]

    def ok(self, colour: str, shape: str) -> bool:
        return (colour, shape) in self.pairs

    def obj(self, cell: int) -> Obj:
        colour, shape = self.rng.choice(self.pairs)
        return Obj(colour, shape, self.rng.choice(SIZES), cell, (self.rng.randint(-4, 4), self.rng.randint(-4, 4)))

    def scene(self) -> Scene:
        cells = self.rng.sample(range(9), self.rng.randint(1, 5))
        return tuple(sorted((self.obj(c) for c in cells), key=lambda o: o.cell))

    def _name(self, scene: Scene, o: Obj) -> str:
        """Shortest description that identifies ``o`` in ``scene`` (position added when needed)."""
        same = [x for x in scene if (x.colour, x.shape, x.size) == (o.colour, o.shape, o.size)]
        return f"the {o.describe()}" if len(same) == 1 else f"the {o.describe()} {_where(o.cell)}"

    def modify(self, scene: Scene, kind: str) -> tuple[Scene, str, str] | None:
        """Apply one modification of ``kind``: (new scene, text, text of the inverse modification);
        None when it does not apply to ``scene``."""
        rng = self.rng
        free = [c for c in range(9) if all(o.cell != c for o in scene)]
        if kind == "add":
            if not free or len(scene) >= 5:
                return None
            new = self.obj(rng.choice(free))
            result = tuple(sorted(scene + (new,), key=lambda o: o.cell))
            return result, f"add a {new.describe()} {_where(new.cell)}", f"remove {self._name(result, new)}"
        if not scene or (kind == "remove" and len(scene) < 2):
            return None
        o = rng.choice(scene)
        rest = tuple(x for x in scene if x is not o)
        if kind == "remove":
            return rest, f"remove {self._name(scene, o)}", f"add a {o.describe()} {_where(o.cell)}"
        pos = POSITIONS[o.cell]
        if kind == "colour":
            options = [c for c in COLOURS if c != o.colour and self.ok(c, o.shape)]
            if not options:
                return None
            changed = replace(o, colour=rng.choice(options))
            text = f"make the {pos} {o.colour} {o.shape} {changed.colour}"
            inverse = f"make the {pos} {changed.colour} {o.shape} {o.colour}"
        elif kind == "shape":
            options = [s for s in SHAPES if s != o.shape and self.ok(o.colour, s)]
            if not options:
                return None
            changed = replace(o, shape=rng.choice(options))
            text = f"turn the {pos} {o.colour} {o.shape} into a {changed.shape}"
            inverse = f"turn the {pos} {o.colour} {changed.shape} into a {o.shape}"
        else:
            changed = replace(o, size="small" if o.size == "large" else "large")
            bigger = changed.size == "large"
            text = f"make the {pos} {o.colour} {o.shape} {'bigger' if bigger else 'smaller'}"
            inverse = f"make the {pos} {o.colour} {o.shape} {'smaller' if bigger else 'bigger'}"
        return tuple(sorted(rest + (changed,), key=lambda x: x.cell)), text, inverse


def _key(scene: Scene) -> tuple:
    return tuple((o.colour, o.shape, o.size, o.cell) for o in scene)


def _novel(*scenes: Scene) -> bool:
    return any((o.colour, o.shape) in HELD_OUT for s in scenes for o in s)


def generate_split(
    out: Path,
    split: str,
    n_queries: int,
    rng: random.Random,
    allow_held_out: bool,
    mods_per_scene: int = 4,
    size: int = 128,
    pair_start: int = 0,
    reverse: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Write ``n_queries`` queries of one split (images + annotations); returns counts.
    ``reverse``: also add every query's inverse (target -> reference, e.g. "add ..." for
    "remove ..."), doubling the pairs at no image cost (used for train)."""
    sampler = _Sampler(rng, allow_held_out)
    names: dict[str, str] = {}
    pairs: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    bar = progress_bar(total=n_queries, desc=f"css {split}", disable=not progress)
    (out / split).mkdir(parents=True, exist_ok=True)

    def save(scene: Scene) -> str:
        name = f"css-{split}-{len(names):06d}"
        draw_scene(scene, size).save(out / split / f"{name}.png", optimize=False)
        names[name] = f"./{split}/{name}.png"
        return name

    set_id, forward = 0, 0
    inverses: list[str] = []
    while forward < n_queries:
        reference = sampler.scene()
        mods: list[tuple[Scene, str, str, str]] = []
        keys = {_key(reference)}
        for _ in range(mods_per_scene * 10):
            kind = rng.choice(KINDS)
            result = sampler.modify(reference, kind)
            if result is None or _key(result[0]) in keys:
                continue
            keys.add(_key(result[0]))
            mods.append((*result, kind))
            if len(mods) == mods_per_scene:
                break
        if len(mods) < mods_per_scene or keys & seen:
            continue  # every gallery scene is distinct within a split
        seen |= keys
        ref_name = save(reference)
        targets = [save(scene) for scene, *_ in mods]
        members = [ref_name] + targets
        for (scene, text, inverse, kind), target in zip(mods, targets):
            if forward == n_queries:
                break
            pairs.append(
                {
                    "pairid": pair_start + len(pairs),
                    "reference": ref_name,
                    "target_hard": target,
                    "target_soft": {target: 1.0},
                    "caption": text,
                    "kind": kind,
                    "novel": _novel(reference, scene),
                    "img_set": {
                        "id": set_id,
                        "members": members,
                        "reference_rank": 0,
                        "target_rank": members.index(target),
                    },
                }
            )
            inverses.append(inverse)
            forward += 1
            bar.update(1)
        set_id += 1
    bar.close()
    if reverse:
        pairs += [
            {
                "pairid": pair_start + len(pairs) + i,
                "reference": p["target_hard"],
                "target_hard": p["reference"],
                "target_soft": {p["reference"]: 1.0},
                "caption": inv,
                "kind": f"inverse-{p['kind']}",
                "novel": p["novel"],
                "img_set": {
                    "id": -1,
                    "members": [p["target_hard"], p["reference"]],
                    "reference_rank": 0,
                    "target_rank": 1,
                },
            }
            for i, (p, inv) in enumerate(zip(list(pairs), inverses))
        ]
    (out / "captions").mkdir(parents=True, exist_ok=True)
    (out / "image_splits").mkdir(parents=True, exist_ok=True)
    (out / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(pairs))
    (out / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(names, indent=0))
    return {"queries": len(pairs), "images": len(names), "novel": sum(p["novel"] for p in pairs)}


def make_css(
    out: str | Path,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 400,
    n_test: int = 800,
    size: int = 128,
    mods_per_scene: int = 4,
    reverse_train: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the benchmark under ``out`` (train/val without `HELD_OUT` pairs, test with every
    pair); returns and writes ``README.json`` with counts and settings."""
    out = Path(out)
    if (out / "captions").exists() and any((out / "captions").iterdir()):
        raise ValueError(f"{out} already holds a benchmark (captions/ is not empty); choose a new --out folder")
    if min(n_train, n_val, n_test) < mods_per_scene or size < 32:
        raise ValueError(f"each split needs at least {mods_per_scene} queries and --size at least 32")
    rng = random.Random(seed)
    counts = {}
    start = 0
    for split, n, held in (("train", n_train, False), ("val", n_val, False), ("test", n_test, True)):
        counts[split] = generate_split(
            out, split, n, rng, held, mods_per_scene, size, start, reverse_train and split == "train", progress
        )
        start += counts[split]["queries"]
    info = {
        "generator": "calibclip make-css",
        "seed": seed,
        "size": size,
        "mods_per_scene": mods_per_scene,
        "held_out_pairs": sorted(" ".join(p) for p in HELD_OUT),
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "reverse_train": reverse_train,
        "splits": counts,
    }
    (out / "README.json").write_text(json.dumps(info, indent=1))
    return info
