"""Why does a person-retrieval model miss? Aggregate failure analysis of text->image rank-1 errors.

For every caption whose top-1 gallery image shows another person, compare the caption with the captions
written for that wrongly ranked image, and, as the noise floor of the same test, with the captions of the
caption's own person's images (two annotators rarely use the same words):

- gender conflict: the caption says man/woman (and kin words) and the top-1 image's captions say the other;
- garment-colour conflict: the caption names a garment with a colour ("red shirt", "black pants") and the
  top-1 image's captions name the same garment with other colours only;
- near misses: where the right person ranks (2-5, 6-10, > 10);
- caption length: R@1 of the shortest and longest third of the captions.

Only counts are printed (no caption text): the datasets' terms forbid redistributing them.

    python tools/person_failures.py --config configs/cuhkpedes.yaml --data-root ../shared/data/cuhkpedes \
        --split val [--model starter-person] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MALE = {"man", "men", "male", "boy", "guy", "gentleman", "he", "his", "him"}
FEMALE = {"woman", "women", "female", "girl", "lady", "she", "her", "hers"}
COLOURS = {
    "black", "white", "red", "blue", "green", "yellow", "grey", "gray", "brown", "pink", "purple", "orange",
    "beige", "khaki", "tan", "navy", "dark", "light", "cream", "maroon", "silver", "gold",
}  # fmt: skip
GARMENTS = {
    "shirt": "top", "tshirt": "top", "t-shirt": "top", "top": "top", "blouse": "top", "sweater": "top",
    "hoodie": "top", "sweatshirt": "top", "jacket": "jacket", "coat": "jacket", "vest": "top", "tank": "top",
    "pants": "bottom", "trousers": "bottom", "jeans": "bottom", "shorts": "bottom", "skirt": "bottom",
    "leggings": "bottom", "dress": "dress", "shoes": "shoes", "sneakers": "shoes", "boots": "shoes",
    "sandals": "shoes", "bag": "bag", "backpack": "bag", "purse": "bag", "handbag": "bag", "hat": "hat",
    "cap": "hat",
}  # fmt: skip
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case word tokens of a caption."""
    return _WORD.findall(text.lower())


def gender(tokens: list[str]) -> str | None:
    """``"m"``, ``"f"`` or None (no gender word, or both)."""
    m, f = any(t in MALE for t in tokens), any(t in FEMALE for t in tokens)
    return "m" if m and not f else "f" if f and not m else None


def garment_colours(tokens: list[str]) -> dict[str, set[str]]:
    """Garment slot -> colours named within the three words before it (``"a dark blue shirt"``)."""
    out: dict[str, set[str]] = defaultdict(set)
    for i, t in enumerate(tokens):
        slot = GARMENTS.get(t)
        if slot is None:
            continue
        for c in tokens[max(0, i - 3) : i]:
            if c in COLOURS and c not in ("dark", "light"):
                out[slot].add("gray" if c == "grey" else c)
    return {k: v for k, v in out.items() if v}


def colour_conflict(q: dict[str, set[str]], g: dict[str, set[str]]) -> bool | None:
    """True when a garment slot named with colours in both has no colour in common; None if no shared slot."""
    shared = [s for s in q if s in g]
    if not shared:
        return None
    return any(not (q[s] & g[s]) for s in shared)


def analyse(sim: np.ndarray, data) -> dict:
    """Failure statistics of a ``[Q, G]`` text->image score matrix on a person-retrieval dataset."""
    q_ids, g_ids = data.caption_ids, data.image_ids
    toks = [words(c) for c in data.captions]
    by_image: dict[int, list[int]] = defaultdict(list)
    for qi, gi in enumerate(data.caption_image):
        by_image[int(gi)].append(qi)
    img_gender = {}
    img_colours = {}
    for gi in range(len(data.images)):
        caps = [toks[q] for q in by_image.get(gi, [])]
        gs = {gender(t) for t in caps} - {None}
        img_gender[gi] = gs.pop() if len(gs) == 1 else None
        merged: dict[str, set[str]] = defaultdict(set)
        for t in caps:
            for k, v in garment_colours(t).items():
                merged[k] |= v
        img_colours[gi] = dict(merged)
    order = np.argsort(-sim, axis=1)
    match = g_ids[order] == q_ids[:, None]
    first = match.argmax(axis=1)  # rank (0-based) of the first right image
    top1 = order[:, 0]
    fail = first > 0
    stats: dict[str, float | int] = {"queries": int(len(q_ids)), "rank1_failures": int(fail.sum())}
    stats["R@1"] = round(100.0 * float((~fail).mean()), 2)
    ranks = first[fail]
    stats["fail_right_at_2_5_pct"] = round(100.0 * float(((ranks >= 1) & (ranks < 5)).mean()), 1)
    stats["fail_right_at_6_10_pct"] = round(100.0 * float(((ranks >= 5) & (ranks < 10)).mean()), 1)
    stats["fail_right_beyond_10_pct"] = round(100.0 * float((ranks >= 10).mean()), 1)

    def rate(pairs: list[tuple[int, int]], test) -> tuple[float, int]:
        vals = [v for v in (test(q, g) for q, g in pairs) if v is not None]
        return (round(100.0 * float(np.mean(vals)), 1) if vals else float("nan")), len(vals)

    def g_conf(q: int, g: int) -> bool | None:
        a, b = gender(toks[q]), img_gender[g]
        return None if a is None or b is None else a != b

    def c_conf(q: int, g: int) -> bool | None:
        return colour_conflict(garment_colours(toks[q]), img_colours[g])

    wrong = [(int(q), int(top1[q])) for q in np.flatnonzero(fail)]
    # Noise floor: the same tests between a caption and its own person's other images.
    own = [
        (q, int(g))
        for q in range(len(q_ids))
        for g in np.flatnonzero(g_ids == q_ids[q])
        if int(g) != int(data.caption_image[q])
    ]
    for name, test in (("gender_conflict", g_conf), ("colour_conflict", c_conf)):
        r, n = rate(wrong, test)
        r0, n0 = rate(own, test)
        stats[f"{name}_top1_wrong_pct"] = r
        stats[f"{name}_top1_wrong_n"] = n
        stats[f"{name}_same_person_pct"] = r0
        stats[f"{name}_same_person_n"] = n0
    lengths = np.array([len(t) for t in toks])
    lo, hi = np.quantile(lengths, [1 / 3, 2 / 3])
    stats["words_median"] = float(np.median(lengths))
    stats["R@1_shortest_third"] = round(100.0 * float((~fail[lengths <= lo]).mean()), 2)
    stats["R@1_longest_third"] = round(100.0 * float((~fail[lengths >= hi]).mean()), 2)
    has_col = np.array([bool(garment_colours(t)) for t in toks])
    stats["captions_with_garment_colour_pct"] = round(100.0 * float(has_col.mean()), 1)
    return stats


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/cuhkpedes.yaml")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--model", default=None, help="registered model or checkpoint (default: the config's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from calibclip.data.cache import FeatureCache
    from calibclip.data.registry import get_dataset
    from calibclip.evaluation.config import load_config
    from calibclip.evaluation.evaluator import SHARD_SIZE, cosine_similarity, dataset_features
    from calibclip.evaluation.runner import load_encoder

    cfg = load_config(args.config)
    spec = get_dataset(cfg["dataset"])
    data = spec.load(args.data_root, args.split)
    model = args.model or cfg["model"]["name"]
    enc = load_encoder(model, spec.task, "cpu", "fp32", cfg["model"].get("clip_image_size"))
    texts, images = dataset_features(enc, data, cache=FeatureCache(enabled=True, shard_size=SHARD_SIZE))
    sim = cosine_similarity(texts["raw"], images["raw"]).numpy()
    stats = {"model": model, "split": args.split, **analyse(sim, data)}
    if args.json:
        print(json.dumps(stats))
    else:
        for k, v in stats.items():
            print(f"{k:36s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
