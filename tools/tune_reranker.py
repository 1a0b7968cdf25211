"""Choose a trained re-ranker's K and fusion weight on the Flickr8k **dev** split (the only split this
tool reads): the re-ranker's match scores of each query's top ``max(K)`` are computed once, then every
``(K, fusion_weight)`` of a small grid is measured (t2i R@1/5/10) over the plain ranking (and, with
``--calibrate``, the calibrated one). The choice: the best R@1 over the plain ranking among the settings
whose R@5 and R@10 are not below plain (ties: the smaller K, then the smaller weight). ``--write DIR``
saves a copy of the re-ranker with the chosen ``top_k`` / ``fusion_weight`` in its config.
A research tool, outside the library (it reads the library's public API only).

    python tools/tune_reranker.py --data-root ../shared/data/flickr8k --rerank runs/rr/best \\
        --top-k 10,20,30 --weights 0.5,1,2 --out tune.json --write runs/rr/tuned

Token views and features come from the feature cache, as `calibclip evaluate --rerank` computes them; the plain
ranking is the cosine of the views' pooled vectors (the encoder's raw features, from the same forward).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from calibclip.calibration.rerank import place_topk
from calibclip.calibration.reranker import Reranking, load_reranker
from calibclip.data.cache import FeatureCache
from calibclip.datasets import load_dataset
from calibclip.evaluation.evaluator import (
    dataset_features,
    dataset_metrics,
    dataset_token_views,
    similarity_matrix,
)
from calibclip.models.registry import create_model

SPLIT = "dev"
KEYS = ("t2i_R@1", "t2i_R@5", "t2i_R@10")


@torch.inference_mode()
def match_topk(sim: torch.Tensor, views: Any, reranking: Reranking, k: int, chunk: int = 128) -> tuple[Any, Any]:
    """Each query's ``k`` best candidates by ``sim`` ``[Q, k]`` (best first) and their match scores."""
    model = reranking.reranker
    gallery = torch.cat(
        [model.project_image(views.image_tokens[s : s + 256].float()) for s in range(0, len(views.image_tokens), 256)]
    )
    idx, match = [], []
    for s in range(0, sim.shape[0], chunk):
        rows = torch.arange(s, min(s + chunk, sim.shape[0]))
        top = torch.topk(sim[rows].float(), k, dim=1).indices
        tokens, mask = views.texts(rows, model.config.max_text_tokens)
        text, pad = model.project_text(tokens, mask)
        scores, _ = model.score_candidates(text, pad, gallery[top])
        idx.append(top)
        match.append(scores.double())
    return torch.cat(idx), torch.cat(match)


def grid(sim: torch.Tensor, idx: torch.Tensor, match: torch.Tensor, ks: list[int], ws: list[float], dataset: Any):
    """Metrics of every ``(K, w)``: the top-K by ``sim`` get ``sim + w * match``, the rest keep their order."""
    rows = []
    sim = sim.double()
    for k in ks:
        top = idx[:, :k]
        base = torch.gather(sim, 1, top)
        for w in ws:
            scores = place_topk(sim, top, base + w * match[:, :k])
            m = dataset_metrics(scores, dataset)
            rows.append({"top_k": k, "fusion_weight": w, **{key: round(float(m[key]), 2) for key in KEYS}})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--rerank", required=True, help="re-ranker folder")
    ap.add_argument("--model", default="starter")
    ap.add_argument("--top-k", default="10,20,30")
    ap.add_argument("--weights", default="0.5,1,2")
    ap.add_argument("--calibrate", action="store_true", help="also measure the grid over the calibrated ranking")
    ap.add_argument("--out", default=None, help="write the grid and the choice as JSON")
    ap.add_argument("--write", default=None, help="save the re-ranker with the chosen top_k / fusion_weight here")
    args = ap.parse_args(argv)
    ks = sorted(int(v) for v in args.top_k.split(","))
    ws = sorted(float(v) for v in args.weights.split(","))
    encoder = create_model(args.model)
    dataset = load_dataset("flickr8k", args.data_root, SPLIT)
    cache = FeatureCache()
    reranker = load_reranker(args.rerank)
    reranking = Reranking(encoder, reranker)
    views = dataset_token_views(encoder, dataset, cache)
    bases: dict[str, torch.Tensor] = {}
    # the plain ranking from the token views' pooled vectors (the encoder's raw features, from the same forward)
    bases["plain"] = similarity_matrix({"raw": views.text_pooled}, {"raw": views.image_pooled}, None)
    report: dict[str, Any] = {"rerank": str(args.rerank), "split": SPLIT, "model": args.model}
    if args.calibrate:
        from calibclip.calibration.methods import create_calibrator

        calibrator = create_calibrator(encoder)
        texts, images = dataset_features(encoder, dataset, cache=cache, calibrator=calibrator)
        bases["calibrated"] = similarity_matrix(texts, images, calibrator)
        diff = max(
            float((torch.as_tensor(texts["raw"]).float() - views.text_pooled.float()).abs().max()),
            float((torch.as_tensor(images["raw"]).float() - views.image_pooled.float()).abs().max()),
        )
        report["raw_vs_views_max_abs_diff"] = diff
        print(f"raw features vs token views' pooled vectors: max |diff| {diff:.2e}")
    for name, sim in bases.items():
        sim = torch.as_tensor(sim)
        ref = dataset_metrics(sim, dataset)
        idx, match = match_topk(sim, views, reranking, max(ks))
        report[name] = {
            "base": {key: round(float(ref[key]), 2) for key in KEYS},
            "grid": grid(sim, idx, match, ks, ws, dataset),
        }
        print(name, report[name]["base"])
        for row in report[name]["grid"]:
            print(f"  K={row['top_k']:3d} w={row['fusion_weight']:<5g}", {k: row[k] for k in KEYS})
    plain = report["plain"]
    ok = [r for r in plain["grid"] if all(r[k] >= plain["base"][k] for k in KEYS[1:])] or plain["grid"]
    best = max(ok, key=lambda r: (r["t2i_R@1"], -r["top_k"], -r["fusion_weight"]))
    report["chosen"] = best
    print("chosen", best)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.write:
        tuned = type(reranker)(reranker.config.replace(top_k=best["top_k"], fusion_weight=best["fusion_weight"]))
        tuned.load_state_dict(reranker.state_dict())
        card = dict(getattr(reranker, "card", {}) or {})
        card["dev_choice"] = {"grid_top_k": ks, "grid_fusion_weight": ws, "chosen": best}
        tuned.save(args.write, card=card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
