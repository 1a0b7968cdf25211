"""Choose and measure CalibCLIP settings on the Flickr8k **dev** split (the only split this
module reads): a small grid over CVE / DCC / re-ranking settings on cached token views, then the
chosen configuration measured end to end through the public `Calibrator` API, plus the added
latency per query. A research tool, outside the library (it reads the library's public API only).

    python tools/tune_calibration.py --data-root ../shared/data/flickr8k --model starter --out tune.json

Token views are cached with the feature cache under the encoder's `Encoder.fingerprint`, so a
second run (or an interrupted one) skips the image pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibclip.calibration.config import CalibrationConfig, parse_overrides
from calibclip.calibration.cve import enhance
from calibclip.calibration.dcc import combine, select_words
from calibclip.calibration.methods import create_calibrator
from calibclip.calibration.rerank import fuse_scores
from calibclip.data.cache import FeatureCache
from calibclip.data.captions import load_flickr8k
from calibclip.evaluation.metrics import recall_at_k
from calibclip.models.base import Encoder, ImageTokens, TextBatch
from calibclip.models.registry import create_model
from calibclip.utils import progress_bar

SPLIT = "dev"

#: The grid (kept small: CPU is shared). Each entry overrides the dataclass defaults.
VISUAL_GRID = [
    {"visual": False},
    {},
    {"dominant_ratio": 1.5},
    {"dominant_ratio": 1.5, "max_dominant_frac": 0.2},
    {"decay_factor": 0.25},
    {"visual_strength": 2.0},
]
SELECTION_GRID = [
    {"textual": False},
    {},
    {"word_ratio": 2.0},
    {"max_masked_words": 2},
]
TEXT_MIX = [0.25, 0.5, 1.0]
TOP_K = [10, 50]
LAM = [0.3, 0.5, 0.7]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _recall(scores: torch.Tensor, caption_image: np.ndarray) -> dict[str, float]:
    r = recall_at_k(scores, caption_image, np.arange(scores.shape[1]))
    return {k: round(v, 2) for k, v in r.items()}


def image_views(encoder: Encoder, paths: list[Path], cache: FeatureCache) -> ImageTokens:
    """`Encoder.image_tokens` of every image, cached under the encoder's fingerprint."""

    def fn(px: torch.Tensor) -> dict[str, torch.Tensor]:
        v = encoder.image_tokens(px)
        return {"pooled": v.pooled, "tokens": v.tokens, "attention": v.attention}

    grid = encoder.image_tokens(encoder.preprocess(paths[0])[None].to(encoder.device, encoder.dtype)).grid
    arrays = cache.image_features(encoder, [str(p) for p in paths], fn=fn, names=("pooled", "tokens", "attention"),
                                  dataset="flickr8k", split=SPLIT, variant="token-view-v1")
    return ImageTokens(*(torch.from_numpy(arrays[k]) for k in ("pooled", "tokens", "attention")), grid=grid)


def text_views(encoder: Encoder, texts: list[str], cache: FeatureCache) -> tuple[torch.Tensor, torch.Tensor, TextBatch]:
    """Raw embeddings, pooling attention and tokens of every caption, padded to one length."""
    length = int(encoder.tokenize(texts).input_ids.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t.float(), (0, length - t.shape[1]))

    def fn(tb: TextBatch) -> dict[str, torch.Tensor]:
        v = encoder.text_tokens(tb)
        return {"pooled": v.pooled, "attention": pad(v.attention), "ids": pad(tb.input_ids),
                "mask": pad(tb.attention_mask), "special": pad(tb.special_mask)}

    a = cache.text_features(encoder, texts, fn=fn, names=("pooled", "attention", "ids", "mask", "special"),
                            dataset="flickr8k", split=SPLIT, variant="token-view-v1")
    batch = TextBatch(torch.from_numpy(a["ids"]).long(), torch.from_numpy(a["mask"]).long(),
                      torch.from_numpy(a["special"]).bool(), list(texts))
    return torch.from_numpy(a["pooled"]), torch.from_numpy(a["attention"]), batch


class DevData:
    """Flickr8k dev views (images and captions) with memoised masked-query embeddings, so each
    distinct (caption, masked words) pair is re-encoded once across the whole grid."""

    def __init__(self, encoder: Encoder, data_root: str | Path, cache: FeatureCache):
        self.encoder = encoder
        self.ds = load_flickr8k(data_root, SPLIT)
        self.views = image_views(encoder, self.ds.images, cache)
        self.t_raw, self.t_att, self.tbatch = text_views(encoder, self.ds.captions, cache)
        self._masked: dict[tuple[int, bytes], torch.Tensor] = {}

    @torch.inference_mode()
    def masked_embeddings(self, masked: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """``[Q, D]`` embeddings of the captions without their masked words (NaN rows: none masked)."""
        enc = self.encoder
        keys = {int(i): (int(i), masked[i].numpy().tobytes()) for i in torch.nonzero(masked.any(1)).flatten()}
        todo = torch.tensor([i for i, k in keys.items() if k not in self._masked], dtype=torch.long)
        if todo.numel():
            todo = todo[torch.argsort(-self.tbatch.attention_mask[todo].sum(1), stable=True)]
            bar = progress_bar(total=len(todo), desc="re-encoding masked queries")
            for start in range(0, len(todo), batch_size):
                idx = todo[start : start + batch_size]
                emb = enc.encode_text(self.tbatch.select(idx).drop_tokens(masked[idx], pad_id=enc.pad_id)).float()
                for i, e in zip(idx.tolist(), emb):
                    self._masked[keys[i]] = e.clone()
                bar.update(len(idx))
            bar.close()
        out = torch.full((len(self.tbatch), enc.embed_dim), float("nan"))
        for i, k in keys.items():
            out[i] = self._masked[k]
        return out

    def text_calibrated(self, cfg: CalibrationConfig) -> tuple[torch.Tensor, float]:
        """What `Calibrator.text_features` returns as "calibrated" for every caption, and the
        fraction of captions that had a word masked."""
        sel = select_words(self.t_att, self.tbatch, cfg)
        rows = sel.masked.any(1)
        cal = self.t_raw.clone().float()
        if rows.any():
            cal[rows] = combine(self.t_raw[rows], self.masked_embeddings(sel.masked)[rows], cfg).float()
        return cal, float(rows.float().mean())

    def image_calibrated(self, cfg: CalibrationConfig) -> torch.Tensor:
        return enhance(self.views, cfg).calibrated.float()


def grid_search(dev: DevData) -> dict[str, Any]:
    """Every VISUAL_GRID x SELECTION_GRID x TEXT_MIX combination, unfused (calibrated similarity
    alone) and re-ranked with every TOP_K x LAM."""
    cap_img = dev.ds.caption_image
    sim_raw = _normalize(dev.t_raw) @ _normalize(dev.views.pooled).T
    results: dict[str, Any] = {"baseline": _recall(sim_raw, cap_img), "runs": []}
    image_cal = {json.dumps(v, sort_keys=True): _normalize(dev.image_calibrated(CalibrationConfig.from_dict(v)))
                 for v in VISUAL_GRID}
    text_cal = {}
    for setting in SELECTION_GRID:
        for mix in TEXT_MIX if setting.get("textual", True) else [0.0]:
            cal, frac = dev.text_calibrated(CalibrationConfig.from_dict({**setting, "text_mix": mix}))
            text_cal[json.dumps({**setting, "text_mix": mix}, sort_keys=True)] = (_normalize(cal), frac)
    bar = progress_bar(total=len(image_cal) * len(text_cal), desc="grid")
    for (vk, img), (tk, (txt, frac)) in itertools.product(image_cal.items(), text_cal.items()):
        sim_cal = txt @ img.T
        row = {"visual": json.loads(vk), "text": json.loads(tk), "masked_query_frac": round(frac, 4)}
        results["runs"].append({**row, "k": None, "lam": 0.0, **_recall(sim_cal, cap_img)})
        for k, lam in itertools.product(TOP_K, LAM):
            results["runs"].append({**row, "k": k, "lam": lam, **_recall(fuse_scores(sim_raw, sim_cal, k, lam), cap_img)})
        bar.update(1)
    bar.close()
    return results


@torch.inference_mode()
def measure(dev: DevData, cfg: CalibrationConfig, n_check: int = 64, n_latency: int = 100) -> dict[str, Any]:
    """One configuration on the whole dev split (plain, calibrated, CVE only, DCC only), computed
    from the cached views and checked against the public `Calibrator` API on the first images and
    ``n_check`` captions; plus the added latency per query (batch of one, gallery precomputed)."""
    enc, ds = dev.encoder, dev.ds
    cal: Any = create_calibrator(enc, config=cfg)
    gallery = {"raw": dev.views.pooled.float(), "calibrated": dev.image_calibrated(cfg)}
    t_cal, frac = dev.text_calibrated(cfg)
    queries = {"raw": dev.t_raw.float(), "calibrated": t_cal}
    img_api = cal.image_features(torch.stack([enc.preprocess(p) for p in ds.images[:4]]))
    txt_api = cal.text_features(ds.captions[:n_check])
    for name, api, ours in (("image", img_api, {k: v[:4] for k, v in gallery.items()}),
                            ("text", txt_api, {k: v[:n_check] for k, v in queries.items()})):
        err = max(float((api[k].float() - ours[k]).abs().max()) for k in ("raw", "calibrated"))
        if err > 1e-4:
            raise RuntimeError(f"cached {name} views disagree with the Calibrator API (max |diff| {err:.2e})")
    out: dict[str, Any] = {"config": cfg.to_dict(), "masked_query_frac": round(frac, 4),
                           "plain": _recall(_normalize(queries["raw"]) @ _normalize(gallery["raw"]).T, ds.caption_image),
                           "calibrated": _recall(cal.scores(queries, gallery), ds.caption_image)}
    raw_q, raw_g = {**queries, "calibrated": queries["raw"]}, {**gallery, "calibrated": gallery["raw"]}
    out["cve_only"] = _recall(cal.scores(raw_q, gallery), ds.caption_image)
    out["dcc_only"] = _recall(cal.scores(queries, raw_g), ds.caption_image)
    g_raw, g_cal = _normalize(gallery["raw"]), _normalize(gallery["calibrated"])
    k = min(10, len(g_raw))
    texts = ds.captions[:: max(1, len(ds.captions) // n_latency)][:n_latency]

    def plain_query(t: str) -> None:
        q = _normalize(enc.encode_text(enc.tokenize([t])))
        torch.topk(q @ g_raw.T, k)

    def calibrated_query(t: str) -> None:
        f = cal.text_features([t])
        sim_raw, sim_cal = _normalize(f["raw"]) @ g_raw.T, _normalize(f["calibrated"]) @ g_cal.T
        torch.topk(cal.fuse(sim_raw, sim_cal), k)

    def clock(fn: Any, t: str) -> float:
        start = time.perf_counter()
        fn(t)
        return (time.perf_counter() - start) * 1000

    for t in texts[:5]:  # warm-up
        plain_query(t)
        calibrated_query(t)
    # paired, interleaved timings (a shared machine's load drifts); medians over the queries
    times = np.array([(clock(plain_query, t), clock(calibrated_query, t)) for t in texts])
    lat = {"plain": round(float(np.median(times[:, 0])), 2), "calibrated": round(float(np.median(times[:, 1])), 2),
           "added": round(float(np.median(times[:, 1] - times[:, 0])), 2), "queries": len(texts),
           "threads": torch.get_num_threads()}
    out["latency_ms_per_query"] = lat
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the grid and/or the end-to-end measurement; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="Flickr8k root (official layout); only the dev split is read")
    p.add_argument("--model", default="starter", help="registered model name or checkpoint path")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--skip-grid", action="store_true", help="only measure the configuration (--set / defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="calibration setting for the end-to-end measurement (default: the encoder's defaults)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--weights", default=None, help="starter head weights file (default: the packaged one)")
    p.add_argument("--views-only", action="store_true", help="only compute and cache the image token views")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = create_model(args.model, **({"weights": args.weights} if args.weights else {}))
    cache = FeatureCache(shard_size=100)  # small shards: an interrupted run resumes
    if args.views_only:
        image_views(encoder, load_flickr8k(args.data_root, SPLIT).images, cache)
        return 0
    out: dict[str, Any] = {"model": encoder.name, "fingerprint": encoder.fingerprint(), "split": SPLIT}
    dev = DevData(encoder, args.data_root, cache)
    if not args.skip_grid:
        out["grid"] = grid_search(dev)
        best = sorted(out["grid"]["runs"], key=lambda r: -r["R@1"])[:10]
        print("baseline", out["grid"]["baseline"])
        for r in best:
            print(r)
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
    cfg = CalibrationConfig.default_for(encoder.name).replace(**parse_overrides(args.overrides))
    out["measure"] = measure(dev, cfg)
    print(json.dumps(out["measure"]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
